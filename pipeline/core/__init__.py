"""Torch-free foundations every layer uses: words, tags, CoNLL, sub-token encoding, typed params and
configs, errors, atomic writes, CPU facts. Imports nothing from the other layers.
"""
