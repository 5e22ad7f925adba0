"""BERT-BiLSTM-CRF tagger: encoder built from its config, pretrained weights loaded apart.

``forward`` returns per-word emissions only; the CRF's transitions live in
``self.crf`` and decoding is a separate step. That split is what lets export
put the emission graph in ONNX and decode with numpy Viterbi.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchcrf import CRF
from transformers import BertConfig, BertModel

from pipeline.core.encoding import DEFAULT_WINDOW_OVERLAP
from pipeline.core.errors import ModelLoadError
from pipeline.modeling import attention
from pipeline.modeling.dropout import use_fast_dropout

log = logging.getLogger(__name__)

ENCODER_CONFIG = "encoder_config.json"
HEAD_CONFIG = "head_config.json"
WEIGHTS = "model.safetensors"
LABELS = "labels.json"
_IGNORED_PREFIXES = ("cls.", "pooler.")
_OPTIONAL_KEYS = ("embeddings.position_ids", "embeddings.token_type_ids")
FORBIDDEN_SCORE = -10000.0  # exp() of it is 0 in float32: a path through it never wins nor carries mass


@dataclass(frozen=True)
class HeadConfig:
    num_tags: int
    lstm_hidden: int = 256
    lstm_layers: int = 1
    dropout: float = 0.1
    max_length: int = 512
    window_overlap: float = DEFAULT_WINDOW_OVERLAP  # windows of texts over max_length (train, eval, serve)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, j]]`` for every ``b, j``: (batch, n, features) rows of a (batch, steps, features) tensor.

    One ``index_select`` over the flattened rows, which exports to one ONNX ``Gather`` (a copy per row);
    ``torch.gather`` with an expanded index exports to ``Expand`` + ``GatherElements``, which builds an int64
    index as large as the output (32 windows of 512 tokens: 50 MB) and reads it element by element."""
    batch, steps, features = x.shape
    flat = index + torch.arange(batch, device=x.device).unsqueeze(1) * steps
    return torch.index_select(x.reshape(batch * steps, features), 0, flat.reshape(-1)).reshape(batch, -1, features)


class LengthAwareBiLSTM(nn.Module):
    """A BiLSTM whose outputs do not depend on right padding.

    ``nn.LSTM(bidirectional=True)`` runs the backward direction over padding
    first, so a sentence's features change with the batch it is in. Here the
    backward direction reads each sequence reversed within its own length;
    this exports to plain ONNX (no packed sequences) and keeps batched and
    single-text inference identical.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, dropout: float) -> None:
        super().__init__()
        self.forward_layers = nn.ModuleList()
        self.backward_layers = nn.ModuleList()
        for layer in range(num_layers):
            size = input_size if layer == 0 else 2 * hidden_size
            self.forward_layers.append(nn.LSTM(size, hidden_size, batch_first=True))
            self.backward_layers.append(nn.LSTM(size, hidden_size, batch_first=True))
        self.dropout = nn.Dropout(dropout)

    @staticmethod
    def _reverse(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        lengths = lengths.unsqueeze(1)
        index = torch.where(steps < lengths, lengths - 1 - steps, steps)
        return gather_rows(x, index)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        for i, (fwd, bwd) in enumerate(zip(self.forward_layers, self.backward_layers)):
            if i > 0:
                x = self.dropout(x)
            out_f, _ = fwd(x)
            out_b, _ = bwd(self._reverse(x, lengths))
            x = torch.cat([out_f, self._reverse(out_b, lengths)], dim=-1)
        return x


class BertBiLstmCrf(nn.Module):
    def __init__(self, encoder_config: BertConfig, head: HeadConfig) -> None:
        super().__init__()
        self.head_config = head
        self.bert = BertModel(encoder_config, add_pooling_layer=False)
        self.dropout = nn.Dropout(head.dropout)
        self.lstm = LengthAwareBiLSTM(encoder_config.hidden_size, head.lstm_hidden, head.lstm_layers, head.dropout)
        self.classifier = nn.Linear(2 * head.lstm_hidden, head.num_tags)
        self.crf = CRF(head.num_tags, batch_first=True)
        # CPU training: dropout at a quarter of the random draws, in the encoder's attention too
        use_fast_dropout(self)
        self.bert.set_attn_implementation(attention.NAME)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, word_index: torch.Tensor,
                word_mask: torch.Tensor) -> torch.Tensor:
        """Emissions ``(batch, words, tags)`` read at each word's first sub-token."""
        # explicit zeros: BERT's buffered token types would bake the position limit into the ONNX graph
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
        words = gather_rows(hidden, word_index)
        lengths = word_mask.sum(dim=1)
        features = self.lstm(self.dropout(words), lengths)
        return self.classifier(self.dropout(features))

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, word_mask: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
        """Negative log-likelihood per sentence (``mean``) or summed over the batch (``sum``)."""
        return -self.crf(emissions.float(), tags, mask=word_mask.bool(), reduction=reduction)

    def forbid_transitions(self, start: list[bool], follows: list[list[bool]], end: list[bool]) -> None:
        """Pin the transitions a tag scheme forbids to ``FORBIDDEN_SCORE`` for good.

        The scores live in the CRF's own parameters, so the saved weights, the
        exported ``crf.json`` and numpy Viterbi all honour them with no extra
        code. Gradient hooks zero their updates; with no weight decay on the
        CRF group, AdamW then leaves them exactly where they are.
        """
        for param, allowed in ((self.crf.start_transitions, start), (self.crf.transitions, follows),
                               (self.crf.end_transitions, end)):
            keep = torch.tensor(allowed, dtype=torch.bool, device=param.device)
            with torch.no_grad():
                param.masked_fill_(~keep, FORBIDDEN_SCORE)
            param.register_hook(lambda grad, keep=keep: grad * keep.to(grad.device))

    def decode(self, emissions: torch.Tensor, word_mask: torch.Tensor) -> list[list[int]]:
        return self.crf.decode(emissions.float(), mask=word_mask.bool())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def find_encoder_weights(encoder_dir: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (encoder_dir / name).is_file():
            return encoder_dir / name
    raise ModelLoadError(f"{encoder_dir}: no model.safetensors or pytorch_model.bin to load weights from")


def load_encoder_weights(bert: BertModel, encoder_dir: str | Path) -> dict[str, list[str]]:
    """Load pretrained weights into ``bert``, tolerating checkpoint naming variants.

    Checkpoints come as ``BertForXxx`` (keys under ``bert.``) or as a bare
    encoder; MLM/NSP heads and the pooler are not part of our encoder. A
    missing encoder weight would silently train from random init, so it is an
    error; extra keys are only listed.
    """
    path = find_encoder_weights(Path(encoder_dir))
    raw = read_state_dict(path)
    state = {}
    ignored = []
    for key, tensor in raw.items():
        name = key[len("bert."):] if key.startswith("bert.") else key
        if name.startswith(_IGNORED_PREFIXES) or name in _OPTIONAL_KEYS:
            ignored.append(key)
            continue
        state[name] = tensor
    result = bert.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in _OPTIONAL_KEYS]
    unexpected = list(result.unexpected_keys)
    log.info("loaded %d encoder tensors from %s (ignored %d head/pooler keys)", len(state) - len(unexpected),
             path, len(ignored))
    if unexpected:
        log.warning("unexpected keys in %s, not loaded: %s", path, unexpected)
    if missing:
        raise ModelLoadError(f"{path}: encoder weights missing for {missing}")
    return {"ignored": ignored, "unexpected": unexpected, "missing": missing}


def build_model(encoder_dir: str | Path, head: HeadConfig, pretrained: bool = True) -> BertBiLstmCrf:
    """Build the encoder from ``config.json``, then load its weights (before any ``.to(device)``)."""
    config_path = Path(encoder_dir) / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{config_path} not found; encoder must be a Hugging Face BERT folder")
    config = BertConfig.from_json_file(str(config_path))
    model = BertBiLstmCrf(config, head)
    if pretrained:
        load_encoder_weights(model.bert, encoder_dir)
    return model


def save_model(model: BertBiLstmCrf, out_dir: Path, labels: dict) -> None:
    """Save everything needed to load and predict without the pretrained folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out_dir / WEIGHTS))
    model.bert.config.to_json_file(str(out_dir / ENCODER_CONFIG))
    (out_dir / HEAD_CONFIG).write_text(json.dumps(asdict(model.head_config), indent=2) + "\n")
    (out_dir / LABELS).write_text(json.dumps(labels, indent=2, ensure_ascii=False) + "\n")


def load_model(model_dir: str | Path) -> tuple[BertBiLstmCrf, dict]:
    model_dir = Path(model_dir)
    for name in (ENCODER_CONFIG, HEAD_CONFIG, WEIGHTS, LABELS):
        if not (model_dir / name).is_file():
            raise ModelLoadError(f"{model_dir / name} not found; is {model_dir} a trained model folder?")
    config = BertConfig.from_json_file(str(model_dir / ENCODER_CONFIG))
    head = HeadConfig(**json.loads((model_dir / HEAD_CONFIG).read_text()))
    model = BertBiLstmCrf(config, head)
    model.load_state_dict(load_file(str(model_dir / WEIGHTS)))
    labels = json.loads((model_dir / LABELS).read_text(encoding="utf-8"))
    model.eval()
    return model, labels
