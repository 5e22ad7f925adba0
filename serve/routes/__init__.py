"""The service's routes, one module per audience: probes (``probes.py``), the plain NER API (``ner.py``), the
Label Studio ML-backend protocol (``labelstudio.py``). Each route takes the :class:`serve.state.ServiceState`
as a dependency."""
