"""Training behaviour users rely on: constrained transitions, schedules, windows, precision, accumulation."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from pipeline.core.conll import Sentence
from pipeline.core.encoding import load_tokenizer
from pipeline.core.errors import DataError, ParamsError
from pipeline.core.tags import allowed_transitions, first_violation, tag_names
from pipeline.modeling.data import make_examples
from pipeline.modeling.model import FORBIDDEN_SCORE, HeadConfig, build_model
from pipeline.modeling.optim import build_optimizer, build_scheduler
from pipeline.modeling.train import TrainConfig, autocast_dtype, check_tag_sequences, cpu_bf16_lstm_works, train
from tests.conftest import make_train_project

TAGS = tag_names(["PER", "LOC"], "BIO")


def test_forbidden_transitions_stay_forbidden_through_training_and_decoding(tiny_encoder):
    torch.manual_seed(0)
    model = build_model(tiny_encoder, HeadConfig(num_tags=len(TAGS), lstm_hidden=8))
    start, follows, end = allowed_transitions(TAGS, "BIO")
    model.forbid_transitions(start, follows, end)
    opt = build_optimizer(model, lr_encoder=1e-3, lr_head=1e-2, lr_crf=1.0, weight_decay=0.01)
    ids = torch.randint(1000, 2000, (4, 12))
    mask = torch.ones(4, 10, dtype=torch.long)
    word_index = torch.arange(1, 11).repeat(4, 1)
    gold = torch.tensor([[0, 1, 2, 2, 0, 3, 4, 0, 0, 1]] * 4)
    for _ in range(5):
        loss = model.loss(model(ids, torch.ones_like(ids), word_index, mask), gold, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    forbidden = ~torch.tensor(follows)
    assert forbidden.any()
    assert torch.all(model.crf.transitions[forbidden] == FORBIDDEN_SCORE)
    assert torch.all(model.crf.start_transitions[~torch.tensor(start)] == FORBIDDEN_SCORE)
    assert torch.all(model.crf.transitions[~forbidden] != FORBIDDEN_SCORE)  # the allowed ones did learn
    emissions = torch.randn(64, 10, len(TAGS)) * 10  # wild emissions: unconstrained Viterbi would pick I- after O
    for path in model.decode(emissions, torch.ones(64, 10, dtype=torch.long)):
        assert first_violation([TAGS[t] for t in path], "BIO") is None


def test_a_forbidden_gold_sequence_is_named_with_its_task(tmp_path):
    sentences = [Sentence("7", "a b", [(0, 1), (2, 3)], ["B-PER", "I-PER"]),
                 Sentence("42", "John went", [(0, 4), (5, 9)], ["O", "I-PER"])]
    with pytest.raises(DataError, match=r"sentence 2 \(task 42\), word 2 'went': tag 'I-PER' after 'O'"):
        check_tag_sequences(sentences, "BIO", tmp_path / "train.conll")


def test_plateau_schedule_warms_up_then_halves_when_dev_f1_stalls():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, "plateau", total_steps=100, warmup=4, plateau_factor=0.5, plateau_patience=1)
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == 0.0 and rates[2] == pytest.approx(0.5) and rates[4:] == [1.0] * 6
    sched.epoch_end(0.5)
    sched.epoch_end(0.5)   # one stalled epoch: patience 1 is not yet exceeded
    assert opt.param_groups[0]["lr"] == 1.0
    sched.epoch_end(0.4)   # second stalled epoch: the rate drops
    assert opt.param_groups[0]["lr"] == 0.5
    sched.step()           # later steps keep the lowered rate
    assert opt.param_groups[0]["lr"] == 0.5


def test_schedule_none_keeps_the_rate_and_unknown_schedules_are_refused():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=0.3)
    sched = build_scheduler(opt, "none", total_steps=10, warmup=0.5)
    for _ in range(10):
        assert opt.param_groups[0]["lr"] == 0.3
        opt.step()
        sched.step()
    with pytest.raises(ParamsError, match="train.schedule"):
        build_scheduler(opt, "exponential", total_steps=10, warmup=0.1)


def test_precision_choices():
    assert autocast_dtype("auto", torch.device("cpu")) is None  # never bf16 on CPU, whatever the CPU has
    if cpu_bf16_lstm_works():
        assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    else:
        with pytest.raises(ParamsError, match="bf16 is not supported on this CPU"):
            autocast_dtype("bf16", torch.device("cpu"))
    with pytest.raises(ParamsError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", torch.device("cpu"))


def test_long_sentences_train_in_overlapping_windows_and_every_word_is_predicted_once(tiny_encoder):
    tokenizer, specials = load_tokenizer(tiny_encoder)
    words = [f"word{i}" for i in range(120)]
    text = " ".join(words)
    spans, pos = [], 0
    for w in words:
        spans.append((pos, pos + len(w)))
        pos += len(w) + 1
    tags = ["O", "B-PER"] + ["I-PER"] * 60 + ["O"] * 58
    sentence = Sentence("1", text, spans, tags)
    examples = make_examples([sentence], tokenizer, specials, {t: i for i, t in enumerate(TAGS)}, 64,
                             overlap=0.5, scheme="BIO")
    assert len(examples) > 2
    owned = []
    covered = 0
    for ex in examples:
        window_tags = [TAGS[t] for t in ex.tags]
        assert first_violation(window_tags, "BIO") is None  # entities cut by an edge are re-tagged
        owned.extend(range(covered, covered + ex.own_hi - ex.own_lo))
        covered += ex.own_hi - ex.own_lo
    assert owned == list(range(len(words)))
    assert sum(len(ex.tags) for ex in examples) > len(words)  # windows overlap: words seen twice in training


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_with_accumulation_the_schedule_steps_once_per_optimizer_step(tmp_path, tiny_encoder, monkeypatch):
    params = make_train_project(tmp_path, tiny_encoder, 80, epochs=2, batch_size=4, grad_accumulation=3,
                                warmup=0, schedule="linear", lstm_hidden=8, threads=1)
    monkeypatch.chdir(tmp_path)
    summary = train("data/conll", tiny_encoder, "models/best", "dvclive/train",
                    TrainConfig.from_params(params["train"]), 0)
    live = tmp_path / "dvclive" / "train" / "plots" / "metrics" / "train"
    lrs = [float(row["head"]) for row in _rows(live / "lr" / "head.tsv")]
    assert len(lrs) == summary["optimizer_steps"] == len(_rows(live / "loss.tsv"))
    # total steps were counted in optimizer steps: the linear decay reaches 0 exactly at the last one
    assert lrs[-1] == 0.0 and lrs[-2] > 0.0


def test_bf16_on_cpu_trains_where_the_cpu_has_bf16_and_is_refused_at_start_elsewhere(tmp_path, tiny_encoder,
                                                                                      monkeypatch):
    params = make_train_project(tmp_path, tiny_encoder, 40, epochs=1, batch_size=8, precision="bf16",
                                lstm_hidden=8, threads=1)
    monkeypatch.chdir(tmp_path)
    config = TrainConfig.from_params(params["train"])
    if not cpu_bf16_lstm_works():  # AVX2-only CPUs (Zen 3): a clear refusal before any work, nothing written
        with pytest.raises(ParamsError, match="bf16 is not supported on this CPU"):
            train("data/conll", tiny_encoder, "models/best", "dvclive/train", config, 0)
        assert not (tmp_path / "models").exists()
        return
    summary = train("data/conll", tiny_encoder, "models/best", "dvclive/train", config, 0)
    assert summary["skipped_steps"] == 0 and summary["best_epoch"] == 1
    assert (tmp_path / "models" / "best" / "model.safetensors").is_file()


def test_bf16_without_hardware_bf16_stops_the_train_stage_with_one_line(tmp_path, tiny_encoder):
    """oneDNN capped at AVX2 behaves as a Zen 3 does: this checks the refusal on every kind of CPU."""
    import subprocess
    import sys

    make_train_project(tmp_path, tiny_encoder, 40, epochs=1, batch_size=8, precision="bf16", lstm_hidden=8,
                       threads=1)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "train.precision: bf16 is not supported on this CPU" in proc.stderr
    assert not (tmp_path / "models" / "best").exists()


def test_lr_find_writes_a_plot_and_a_suggestion_below_where_the_loss_explodes(tmp_path, tiny_encoder):
    import subprocess
    import sys

    params = make_train_project(tmp_path, tiny_encoder, 80, batch_size=4, lstm_hidden=8, threads=1)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "lr-find", "--start", "1e-6", "--end", "10",
                           "--steps", "60"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / params["paths"]["lr_find_report"]).read_text())
    lrs = [p["lr_encoder"] for p in report["points"]]
    assert lrs == sorted(lrs) and lrs[0] == pytest.approx(1e-6)
    assert report["stopped_early"]  # encoder at 10, CRF at 2000: the loss must blow up before the end
    pick = report["suggested"]
    assert 1e-6 <= pick["lr_encoder"] < lrs[-1]
    ratio = params["train"]["lr_crf"] / params["train"]["lr_encoder"]
    assert pick["lr_crf"] == pytest.approx(pick["lr_encoder"] * ratio)
    png = (tmp_path / params["paths"]["lr_find_plot"]).read_bytes()
    assert png.startswith(b"\x89PNG")


def test_rates_written_as_dvc_overrides_are_read_as_numbers(tmp_path):
    # `dvc exp run -S train.lr_head=5e-5` writes `lr_head: 5e-5`, which YAML reads as a string.
    from pipeline.core.params import load_params

    (tmp_path / "params.yaml").write_text("train:\n  lr_head: 5e-5\n  lr_crf: 1e-1\n  warmup: 0\n  epochs: '3'\n")
    config = TrainConfig.from_params(load_params(tmp_path / "params.yaml")["train"])
    assert (config.lr_head, config.lr_crf, config.warmup, config.epochs) == (5e-5, 0.1, 0.0, 3)
    assert isinstance(config.lr_head, float)


def test_a_value_of_the_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ParamsError, match=r"train\.lr_head: .*'fast'") as excinfo:
        TrainConfig.from_params({"lr_head": "fast", "epochs": 6})
    assert "train.epochs" not in str(excinfo.value)


def test_a_warm_start_begins_from_the_trained_weights_and_refuses_another_tag_set(tmp_path, tiny_encoder,
                                                                                 monkeypatch):
    from pipeline.modeling.model import load_model
    from pipeline.modeling.train import prepare

    params = make_train_project(tmp_path, tiny_encoder, 60, epochs=1, batch_size=8, lstm_hidden=8, threads=1)
    monkeypatch.chdir(tmp_path)
    train("data/conll", tiny_encoder, "models/best", "dvclive/train", TrainConfig.from_params(params["train"]), 0)
    trained, _ = load_model("models/best")
    warm = TrainConfig.from_params({**params["train"], "init_from": "models/best"})
    model, _ = prepare("data/conll", tiny_encoder, warm, torch.device("cpu"))
    for name, tensor in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    cold, _ = prepare("data/conll", tiny_encoder, TrainConfig.from_params(params["train"]), torch.device("cpu"))
    assert not torch.equal(cold.state_dict()["crf.transitions"], trained.state_dict()["crf.transitions"])

    labels = json.loads((tmp_path / "models" / "best" / "labels.json").read_text())
    (tmp_path / "models" / "best" / "labels.json").write_text(json.dumps({**labels, "tags": labels["tags"][:-1]}))
    with pytest.raises(ParamsError, match="train.init_from: .* trained on the tags"):
        prepare("data/conll", tiny_encoder, warm, torch.device("cpu"))
    bigger = TrainConfig.from_params({**params["train"], "init_from": "models/best", "lstm_hidden": 16})
    (tmp_path / "models" / "best" / "labels.json").write_text(json.dumps(labels))
    with pytest.raises(ParamsError, match="does not fit this model"):
        prepare("data/conll", tiny_encoder, bigger, torch.device("cpu"))


def test_the_convert_to_train_hand_off_reads_each_conll_file_once(tmp_path, tiny_encoder):
    """Training loads the CoNLL set once (no second pass for tags, counts or checks): at a million tasks a
    second read would double the stage's start-up. An audit hook in a fresh interpreter counts the opens."""
    params = make_train_project(tmp_path, tiny_encoder, 60, epochs=1, batch_size=8, lstm_hidden=8, threads=1)
    code = """
import collections, json, sys
opened = collections.Counter()
sys.addaudithook(lambda event, args: event == "open" and str(args[0]).endswith(".conll")
                 and opened.update([str(args[0]).rsplit("/", 1)[-1]]))
import torch
from pipeline.modeling.train import TrainConfig, prepare
prepare("data/conll", sys.argv[1], TrainConfig.from_params(json.loads(sys.argv[2])), torch.device("cpu"))
print(json.dumps(opened))
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_encoder), json.dumps(params["train"])],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"train.conll": 1, "dev.conll": 1}
