"""Label Studio -> CoNLL -> BERT-BiLSTM-CRF -> ONNX -> Label Studio pre-annotations."""

__version__ = "0.1.0"
