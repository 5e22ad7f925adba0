"""Everything about Label Studio: the SDK client (the only module that talks to a server), label
configs, streaming exports, export -> tagged sentences (and the SDK's reference converter), prediction
regions, push. Torch-free.
"""
