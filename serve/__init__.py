"""HTTP service over the exported ONNX model: a NER API and a Label Studio ML backend."""
