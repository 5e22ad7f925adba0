"""When training goes wrong: unknown gold tags, NaN traced to its origin, CUDA out-of-memory back-off (issue 22)."""

import logging
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.core.conll import read_conll
from pipeline.core.errors import DataError
from pipeline.modeling.data import bucket_batches
from pipeline.modeling.distributed import World
from pipeline.modeling.train import (OutOfDeviceMemory, TrainConfig, TrainingDiverged, TrainingRun, _NoLive,
                                     check_known_tags, prepare)
from tests.conftest import make_train_project

pytestmark = pytest.mark.slow
NAN = float("nan")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_encoder) -> Path:
    root = tmp_path_factory.mktemp("safety")
    make_train_project(root, tiny_encoder, 80, epochs=1, batch_size=8, lstm_hidden=8, dropout=0.0, warmup=0,
                       schedule="constant", max_bad_steps=2, threads=1)
    return root


def make_run(root: Path, **train: object) -> TrainingRun:
    params = yaml.safe_load((root / "params.yaml").read_text())
    config = TrainConfig.from_params({**params["train"], **train})
    return TrainingRun(World(0, 1, torch.device("cpu")), root / params["paths"]["conll_dir"],
                       params["paths"]["encoder"], root / "models" / "best", config, 0, None)


# -- label ids checked before the device ----------------------------------------------------------------------

def _retag(path: Path, sentence: int, word: int, tag: str) -> tuple[int, str, str]:
    """Hand-edit one gold tag of a 4-column CoNLL file; returns the edited line, its task id and word."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    seen, rows, task = 0, 0, ""
    for i, line in enumerate(lines):
        if line.startswith("# task_id = "):
            task, seen, rows = line.split("=")[1].strip(), seen + 1, 0
        elif line.strip() and seen == sentence:
            rows += 1
            if rows == word:
                cols = line.split("\t")
                lines[i] = "\t".join([cols[0], tag, *cols[2:]])
                path.write_text("".join(lines), encoding="utf-8")
                return i + 1, task, cols[0]
    raise AssertionError("no such word")


def test_an_unknown_gold_tag_stops_training_before_the_device_naming_file_sentence_line_task_and_word(
        tmp_path, project):
    shutil.copytree(project, tmp_path / "p", ignore=shutil.ignore_patterns(".git", "models", "dvclive"))
    conll = tmp_path / "p" / "data" / "conll"
    line, task, word = _retag(conll / "train.conll", 3, 2, "B-FOO")
    expected = (f"train.conll: sentence 3 (line {line}, task {task}), word 2 {word!r}: tag 'B-FOO' is not in "
                "labels.json's tag set")
    params = yaml.safe_load((tmp_path / "p" / "params.yaml").read_text())
    with pytest.raises(DataError) as excinfo:
        prepare(conll, params["paths"]["encoder"], TrainConfig.from_params(params["train"]), torch.device("cpu"))
    assert expected in str(excinfo.value)

    proc = subprocess.run([sys.executable, "-m", "pipeline", "train"], cwd=tmp_path / "p", capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "p" / "models" / "best").exists()


def test_an_unknown_tag_in_a_plain_two_column_file_is_named_by_its_line(tmp_path):
    path = tmp_path / "dev.conll"
    path.write_text("-DOCSTART- O\n\nJohn B-PER\nlives O\n\n# a comment\nin O\nParis B-CITY\n\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"dev.conll: sentence 2 \(line 8\), word 2 'Paris': tag 'B-CITY' is not"):
        check_known_tags(list(read_conll(path)), ["O", "B-PER", "I-PER"], path)
    check_known_tags(list(read_conll(path)), ["O", "B-PER", "I-PER", "B-CITY"], path)  # known tags pass


# -- NaN traced to its origin ---------------------------------------------------------------------------------

def _diverge(run: TrainingRun, caplog: pytest.LogCaptureFixture) -> tuple[str, list[str]]:
    """Train until the NaN guard stops the run; its error message and the per-step warnings."""
    with caplog.at_level(logging.WARNING, logger="pipeline.modeling.train"), \
            pytest.raises(TrainingDiverged) as excinfo:
        run.fit(_NoLive())
    warnings = [r.getMessage() for r in caplog.records if "skipped an optimizer step" in r.getMessage()]
    assert len(warnings) == 2  # max_bad_steps: once per bad step
    return str(excinfo.value), warnings


@pytest.mark.parametrize("module", ["bert.encoder.layer.1.output.dense", "lstm"])
def test_a_nan_made_by_one_layer_is_traced_to_that_layer(project, caplog, module):
    run = make_run(project)
    run.model.get_submodule(module).register_forward_hook(lambda mod, args, out: out * NAN)
    message, warnings = _diverge(run, caplog)
    origin = f"module {module} produced the first non-finite output"
    assert f"last one: {origin}" in message and "not finite for 2 optimizer steps in a row" in message
    assert all("loss is not finite" in w and origin in w for w in warnings)


def test_a_weight_that_is_already_nan_is_named(project, caplog):
    run = make_run(project)
    with torch.no_grad():
        run.model.lstm.backward_layers[0].weight_hh_l0[0, 0] = NAN
    message, _ = _diverge(run, caplog)
    assert "weight lstm.backward_layers.0.weight_hh_l0 is already not finite" in message


def test_a_gradient_that_goes_nan_with_a_finite_forward_is_named_and_the_diagnosis_leaves_the_rng_alone(
        project, caplog):
    run = make_run(project)
    run.model.classifier.bias.register_hook(lambda grad: grad * NAN)
    batch = bucket_batches(run.data.train_ex, 8, random.Random(0))[0]
    assert run._accumulate(batch)[2]  # the loss is finite
    rng = torch.get_rng_state()
    origin = run._nan_origin()
    assert torch.equal(rng, torch.get_rng_state())
    assert (origin.kind, origin.name) == ("gradient", "classifier.bias")
    run._new_step()
    message, warnings = _diverge(run, caplog)
    assert "forward was finite; the gradient of classifier.bias went non-finite first" in message
    assert all("gradient norm is not finite" in w for w in warnings)


# -- CUDA out-of-memory back-off ------------------------------------------------------------------------------

def _raise_oom(grad: torch.Tensor) -> None:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")  # a CPU build constructs it too


class OutOfMemoryAbove(torch.nn.Module):
    """The training objective, running out of memory for batches over ``limit``: in forward, or mid-backward
    (after the CRF's gradients are in, so a naive retry would count them twice)."""

    def __init__(self, model: torch.nn.Module, limit: int, during: str) -> None:
        super().__init__()
        self.model, self.limit, self.during = model, limit, during
        self.sizes: list[int] = []

    def forward(self, input_ids, attention_mask, word_index, word_mask, tags):
        self.sizes.append(len(input_ids))
        too_big = len(input_ids) > self.limit
        if too_big and self.during == "forward":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        emissions = self.model(input_ids, attention_mask, word_index, word_mask)
        if too_big:
            emissions.register_hook(_raise_oom)
        return self.model.loss(emissions, tags, word_mask, reduction="sum")


def _one_step(run: TrainingRun, batches: list[list[int]]) -> tuple[dict[str, torch.Tensor], list[int]]:
    """Accumulate the batches, step once; returns the gradients the step used and the sizes of its pieces."""
    run.model.eval()  # no dropout anywhere (the encoder's own included): both runs compute the same function
    finite = [run._accumulate(b)[2] for b in batches]
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}
    pieces = [len(ids) for ids, _ in run.step_pieces]
    assert all(finite) and run._optimizer_step(True, 0)
    return grads, pieces


@pytest.mark.parametrize("during", ["forward", "backward"])
def test_out_of_memory_splits_the_batch_and_the_step_equals_the_unsplit_one(project, caplog, during):
    whole = make_run(project, grad_accumulation=2, lr_encoder=1e-3)
    split = make_run(project, grad_accumulation=2, lr_encoder=1e-3)
    split.objective = OutOfMemoryAbove(split.model, 2, during)
    batches = [b for b in bucket_batches(whole.data.train_ex, 8, random.Random(0)) if len(b) == 8][:2]
    assert len(batches) == 2
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        assert torch.equal(a, b), name  # the same seed built the same model

    expected, whole_pieces = _one_step(whole, batches)
    with caplog.at_level(logging.WARNING, logger="pipeline.modeling.train"):
        got, split_pieces = _one_step(split, batches)
    assert (whole_pieces, split_pieces) == ([8, 8], [2] * 8)  # each batch of 8 went in as four pieces of 2
    # a backward that fails part-way has added part of its gradient: the step's earlier pieces are replayed
    assert split.objective.sizes.count(2) == (8 if during == "forward" else 24)
    oom = [r.getMessage() for r in caplog.records if "out of memory" in r.getMessage()]
    assert [m.split(":")[0] for m in oom] == ["out of memory at batch size 8", "out of memory at batch size 4"]
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-4, atol=1e-6), name
    for (name, a), b in zip(whole.model.named_parameters(), split.model.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), name
    assert split.progress.seen == whole.progress.seen == 16
    assert split.progress.total_loss == pytest.approx(whole.progress.total_loss, rel=1e-5)


def test_one_example_that_does_not_fit_is_a_typed_error(project):
    run = make_run(project)
    run.objective = OutOfMemoryAbove(run.model, 0, "backward")
    batch = bucket_batches(run.data.train_ex, 8, random.Random(0))[0]
    with pytest.raises(OutOfDeviceMemory, match=r"out of memory on cpu with 1 example\(s\) of up to \d+ "
                                                 r"sub-tokens, after splitting .*lower train.max_length"):
        run._accumulate(batch)
