"""Every knob of the service, read from ``NER_*`` environment variables (``python -m serve`` flags set them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

API_KEY_ENV = "NER_API_KEY"


@dataclass(frozen=True)
class Settings:
    """Every knob of the service; ``from_env`` reads them from ``NER_*`` variables."""

    model_dir: Path = Path("models/onnx")
    api_key: str | None = None
    max_texts: int = 256            # texts per request (/v1/ner)
    max_predict_tasks: int = 10_000  # tasks per /predict: Label Studio sends a whole "Retrieve predictions" selection
    max_chars: int = 100_000        # characters per text (long texts are windowed)
    max_body_bytes: int = 10 << 20  # request body
    max_predict_body_bytes: int = 64 << 20  # /predict's body (full task dicts, annotations included)
    max_config_chars: int = 262_144  # a label config in /predict or /setup
    max_batch_size: int = 64        # texts per runtime call (micro-batch)
    max_wait_ms: float = 2.0        # how long a batch waits for company after its first request
    max_batch_tokens: int = 1024    # sub-tokens per runtime call: a call of long windows stays short (fairness)
    onnx_batch_size: int = 8        # texts per ONNX run inside a runtime call (sorted by length first)
    bulk_chars: int = 10_000        # requests of more characters run in the bulk lane, beside the others (0: one lane)
    quantized: bool = False         # serve int8: the graph for this CPU (model.int8-avx2.onnx without VNNI)
    threads: int = 0                # ONNX Runtime intra-op threads (0: one per core)
    # ONNX Runtime's threads keep spinning after each call: a shorter tail for one-tweet requests beside a bulk
    # request, less throughput at 32 clients and a core held while idle (README, Serving)
    ort_spin_after_call: bool = False
    params_file: Path = Path("params.yaml")  # the DVC workspace's params: the labelling loop trains with them
    loop: bool = True               # Start Training runs the labelling loop (needs params_file; README)
    public_url: str | None = None   # the URL Label Studio reaches this service at: its webhook then gets the key
    reload_interval_s: float = 2.0  # how often the model folder is checked for a change (0: SIGHUP and /setup only)

    ENV = {"model_dir": "NER_MODEL_DIR", "api_key": API_KEY_ENV, "max_texts": "NER_MAX_TEXTS",
           "max_predict_tasks": "NER_MAX_PREDICT_TASKS", "max_predict_body_bytes": "NER_MAX_PREDICT_BODY_BYTES",
           "max_chars": "NER_MAX_CHARS", "max_body_bytes": "NER_MAX_BODY_BYTES",
           "max_config_chars": "NER_MAX_CONFIG_CHARS",
           "max_batch_size": "NER_MAX_BATCH_SIZE", "max_wait_ms": "NER_MAX_WAIT_MS",
           "max_batch_tokens": "NER_MAX_BATCH_TOKENS",
           "onnx_batch_size": "NER_ONNX_BATCH_SIZE", "bulk_chars": "NER_BULK_CHARS",
           "quantized": "NER_QUANTIZED", "threads": "NER_THREADS",
           "ort_spin_after_call": "NER_ORT_SPIN_AFTER_CALL", "params_file": "NER_PARAMS",
           "loop": "NER_LOOP", "public_url": "NER_PUBLIC_URL", "reload_interval_s": "NER_RELOAD_INTERVAL_S"}

    def __post_init__(self) -> None:
        for name in ("max_texts", "max_predict_tasks", "max_chars", "max_config_chars", "max_batch_size",
                     "max_batch_tokens", "onnx_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} ({self.ENV[name]}) must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(cls.ENV[f.name])
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _parse(f.name, raw)
            except ValueError:
                raise ValueError(f"{cls.ENV[f.name]}={raw!r} is not a valid {f.name}") from None
        return cls(**values)

    def ort_threads(self) -> int:
        """ONNX Runtime threads: one per core. Leaving the event loop a core of its own measured worse: int8 at
        32 clients, 0.36 of the in-process rate with one ORT thread on 2 cores, 0.55 with two (README, Serving)."""
        if self.threads > 0:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _parse(name: str, raw: str) -> Any:
    if name in ("model_dir", "params_file"):
        return Path(raw)
    if name in ("api_key", "public_url"):
        return raw
    if name in ("quantized", "loop", "ort_spin_after_call"):
        if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(raw)
        return raw.lower() in ("1", "true", "yes")
    value = float(raw) if name in ("max_wait_ms", "reload_interval_s") else int(raw)
    if value < 0:
        raise ValueError(raw)
    return value
