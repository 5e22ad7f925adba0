"""The torch side: the BERT-BiLSTM-CRF model, batches, optimizer groups and schedules, the training
loop with checkpoints and DDP, evaluation of the PyTorch model, ONNX export and int8 quantization.
"""
