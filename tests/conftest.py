"""Shared fixtures: a tiny BERT folder and one real `dvc repro` of the whole pipeline.

The tiny encoder is a real Hugging Face BERT checkpoint (``BertForMaskedLM``
saved with ``save_pretrained``: ``bert.`` prefixes, an MLM head, tied
weights), only small, so the full pipeline runs in about a minute on 2 cores
and exercises the same loading code as bert-base-cased would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import settings

# Shared 2-core machines stall now and then: a per-example deadline would make property tests flaky.
settings.register_profile("shared-machine", deadline=None, print_blob=True)
settings.load_profile("shared-machine")

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MINILM = ROOT / "pretrained" / "all-MiniLM-L6-v2"
SPECIAL_TEXTS = [
    "我爱北京天安门，Obama 也来了。",
    "😀😀 Barack Obama 👨‍👩‍👧 visited New York City today!",
    "Line one in London\r\nLine two in Paris\r\n",
    "Zoë Saldaña and José Mourinho met in Lisbon",
]


def tool_env(home: Path) -> dict[str, str]:
    """Environment for DVC and git in tests: no analytics, a temp HOME, a git identity."""
    env = dict(os.environ)
    env.update({
        "HOME": str(home),
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    })
    return env


def fresh_shell(env: dict[str, str]) -> dict[str, str]:
    """``env`` as a shell has it that never activated the virtualenv: its bin folder off PATH (``make test``
    puts it there), for commands the README shows as ``.venv/bin/python -m ...``."""
    venv = os.path.realpath(VENV_BIN)
    path = [part for part in env.get("PATH", "").split(os.pathsep) if part and os.path.realpath(part) != venv]
    return {**env, "PATH": os.pathsep.join(path or ["/usr/bin", "/bin"])}


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    if not (MINILM / "model.safetensors").is_file():
        pytest.fail(f"{MINILM} missing: run `make setup` (the README's commands do) to fetch the encoder")
    return MINILM


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, minilm_dir) -> Path:
    import torch
    from transformers import BertConfig, BertForMaskedLM

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    vocab = json.loads((minilm_dir / "config.json").read_text())["vocab_size"]
    config = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertForMaskedLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(minilm_dir / name, out / name)
    return out


@dataclass
class PipelineRun:
    root: Path
    env: dict[str, str]
    params: dict
    first_stdout: str

    def path(self, key: str) -> Path:
        return self.root / self.params["paths"][key]


def small_export(n_tasks: int) -> list[dict]:
    """The first tasks of the sample export, plus unlabeled tasks with hard texts."""
    tasks = json.loads((ROOT / "data" / "labelstudio" / "export.json").read_text(encoding="utf-8"))[:n_tasks]
    next_id = max(t["id"] for t in tasks) + 1
    long_text = " ".join(f"Sentence {i} mentions Barack Obama in New York and 北京 😀." for i in range(60))
    for i, text in enumerate(SPECIAL_TEXTS + [long_text]):
        tasks.append({"id": next_id + i, "data": {"text": text}, "annotations": [], "predictions": []})
    return tasks


def write_small_project(root: Path, encoder: Path, n_tasks: int, **train: object) -> dict:
    """Sample data, label config and params (tiny encoder, ``train`` overrides) for a project copy."""
    (root / "data" / "labelstudio").mkdir(parents=True)
    shutil.copy2(ROOT / "data" / "labelstudio" / "label_config.xml", root / "data" / "labelstudio")
    (root / "data" / "labelstudio" / "export.json").write_text(
        json.dumps(small_export(n_tasks), ensure_ascii=False), encoding="utf-8")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["paths"]["encoder"] = str(encoder)
    params["train"].update(train)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def make_train_project(root: Path, encoder: Path, n_tasks: int, **train: object) -> dict:
    """A small project copy, converted and committed, ready for ``python -m pipeline train``."""
    params = write_small_project(root, encoder, n_tasks, **train)
    subprocess.run([sys.executable, "-m", "pipeline", "convert"], cwd=root, check=True, capture_output=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)  # DVCLive wants a repository with a commit
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "--allow-empty", "-m", "x"],
                   cwd=root, check=True)
    return params


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, tiny_encoder) -> PipelineRun:
    """A copy of the project run end to end by real `dvc repro`, on small data and the tiny encoder."""
    root = tmp_path_factory.mktemp("project")
    home = tmp_path_factory.mktemp("home")
    env = tool_env(home)
    shutil.copy2(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    params = write_small_project(root, tiny_encoder, 400, epochs=2, batch_size=16, lstm_hidden=32,
                                 lr_encoder=1e-3)
    (root / ".gitignore").write_text("__pycache__/\n")
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "test project"], root, env)
    proc = run(["dvc", "repro"], root, env)
    return PipelineRun(root, env, params, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """A real Label Studio server (own virtualenv, installed on first use), for the whole session."""
    from tests.labelstudio_server import LabelStudioServer, ensure_label_studio_venv

    ensure_label_studio_venv()
    with LabelStudioServer(tmp_path_factory.mktemp("label-studio")) as server:
        yield server


#: The only tag path a forced model allows: every word is part of an entity, in pairs of three types.
FORCED_CYCLE = ["B-person", "I-person", "B-geo-loc", "I-geo-loc", "B-company", "I-company"]
FORCED_VERSION = "forced-word-pairs"


@pytest.fixture(scope="session")
def forced_onnx(pipeline_run, tmp_path_factory) -> Path:
    """The pipeline's exported model with a CRF that allows only the FORCED_CYCLE path.

    The tiny test model predicts no entity at all, so a check over its entities loops over nothing. This copy
    runs the same graph, words, windows and span building, and puts an entity on every word (after emoji,
    across ZWJ sequences and CRLF, over CJK characters), so offset checks have something to check.
    """
    model = tmp_path_factory.mktemp("forced-model") / "onnx"
    shutil.copytree(pipeline_run.path("onnx_dir"), model)
    crf = json.loads((model / "crf.json").read_text())
    tags, blocked = crf["tags"], -10000.0
    follows = {a: FORCED_CYCLE[(i + 1) % len(FORCED_CYCLE)] for i, a in enumerate(FORCED_CYCLE)}
    crf["start_transitions"] = [0.0 if t == FORCED_CYCLE[0] else blocked for t in tags]
    crf["end_transitions"] = [0.0] * len(tags)
    crf["transitions"] = [[0.0 if follows.get(a) == b else blocked for b in tags] for a in tags]
    (model / "crf.json").write_text(json.dumps(crf))
    info = json.loads((model / "model_info.json").read_text())
    (model / "model_info.json").write_text(json.dumps({**info, "model_version": FORCED_VERSION}))
    return model
