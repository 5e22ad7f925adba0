"""The labelling loop: score a candidate and the served model alike, gate, register, promote. Torch-free.

Training itself runs in another process (a DVC experiment); this layer decides what happens with its result.
"""
