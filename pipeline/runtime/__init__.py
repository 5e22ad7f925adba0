"""The torch-free inference runtime shared by predict, serve and the benchmarks: ONNX Runtime,
numpy Viterbi and marginals, spans back to character offsets. Knows nothing of Label Studio.
"""
