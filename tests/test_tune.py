"""``python -m pipeline tune`` (issue 22): a real Optuna study whose trials are real DVC experiments of the train
stage, in a copy of the test project (tiny encoder, templated sentences it learns within an epoch).

One study, run twice: two trials that finish side by side (DVC experiments with their params, each on its share
of the cores), then resumed with a third trial whose rates are all 0, which the median pruner stops at its first
epoch: a model that cannot learn stays below both finished trials, so the pruning is certain, not a matter of
chance. The workspace's tracked files stay as they were, nothing enters DVC's run cache, and the best trial
applies with one command. A tuner interrupted while two trials run stops both of their trainings.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.__main__ import main
from pipeline.tuning.trial import descendants
from tests.conftest import fresh_shell, run
from tests.test_dvc_experiments import experiments
from tests.test_loop import templated_tasks

pytestmark = pytest.mark.slow
RATES = ("lr_encoder", "lr_head", "lr_crf")


def tune_section(**changes: object) -> dict:
    section = {"trials": 2, "timeout": 0, "sampler": "random", "pruner": "none", "jobs": 2, "startup_trials": 1,
               "min_epochs": 1, "seed": 0, "study": "tune", "storage": "reports/tune.db",
               "space": {"lr_encoder": {"low": 5e-4, "high": 2e-3},
                         "lr_head": {"low": 0.01, "high": 0.02},
                         "dropout": {"low": 0.0, "high": 0.2},
                         "epochs": {"choices": [3]}}}
    return section | changes


@pytest.fixture(scope="module")
def project(pipeline_run, tmp_path_factory) -> Path:
    """The test project's DVC workspace with templated data (converted, committed) and a git-ignored encoder."""
    root = tmp_path_factory.mktemp("tune") / "project"
    shutil.copytree(pipeline_run.root, root, symlinks=True)
    env = pipeline_run.env
    shutil.copytree(pipeline_run.params["paths"]["encoder"], root / "pretrained" / "tiny")
    with (root / ".gitignore").open("a") as fh:
        fh.write("/pretrained/\n/models/checkpoints/\n/reports/tune.db\n")
    tasks = [{"id": i + 1, **task} for i, task in enumerate(templated_tasks(300, 1, annotated=True))]
    (root / "data" / "labelstudio" / "export.json").write_text(json.dumps(tasks))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["paths"]["encoder"] = "pretrained/tiny"
    params["train"].update(batch_size=8, lr_crf=0.1, patience=5)
    params["tune"] = tune_section()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "convert"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tune settings"], root, env)
    return root


def tune(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    """``.venv/bin/python -m pipeline tune`` from a shell without the virtualenv on PATH, as the README shows it
    (the trials' stages must still run under the virtualenv's python)."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "tune", *args], cwd=root, env=fresh_shell(env),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def tracked_state(root: Path, env: dict) -> dict[str, str]:
    """sha256 of params.yaml, dvc.lock and every file under models/, and git's view of tracked changes."""
    files = [root / "params.yaml", root / "dvc.lock", *sorted((root / "models").rglob("*"))]
    state = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}
    state["git status"] = run(["git", "status", "--porcelain", "--untracked-files=no"], root, env).stdout
    return state


def run_cache_entries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in (root / ".dvc" / "cache" / "runs").rglob("*"))


def test_a_study_runs_experiments_resumes_and_prunes_without_touching_the_workspace(project, pipeline_run):
    root, env = project, pipeline_run.env
    before, run_cache = tracked_state(root, env), run_cache_entries(root)

    first = tune(root, env)
    assert "dvc exp apply tune-" in first.stderr
    report = json.loads((root / "reports" / "tune.json").read_text())
    assert [(t["number"], t["state"]) for t in report["trials"]] == [(0, "COMPLETE"), (1, "COMPLETE")]
    shown = experiments(json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout))
    for trial in report["trials"]:
        assert trial["experiment"] == f"tune-{trial['number']}" and trial["experiment"] in shown, sorted(shown)
        data = shown[trial["experiment"]]
        train = data["params"]["params.yaml"]["data"]["train"]
        assert {k: train[k] for k in trial["params"]} == trial["params"]
        assert train["threads"] == max(1, len(os.sched_getaffinity(0)) // 2)  # tune.jobs 2: half the cores each
        live = data["metrics"]["dvclive/train/metrics.json"]["data"]
        assert live["best_dev_f1"] == pytest.approx(trial["dev_f1"]) == pytest.approx(max(trial["dev_f1_per_epoch"]))
        assert len(trial["dev_f1_per_epoch"]) == 3
    learned = min(t["dev_f1_per_epoch"][0] for t in report["trials"])
    assert learned > 0.3, report["trials"]  # the templated data is learned within one epoch
    # what the pruner judged at each epoch: the best dev F1 so far (the objective), not the epoch's own
    import optuna
    study = optuna.load_study(study_name=report["study"], storage=f"sqlite:///{root / 'reports' / 'tune.db'}")
    first, second = study.trials
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete
    for trial in study.trials:
        reported = [trial.intermediate_values[epoch] for epoch in sorted(trial.intermediate_values)]
        assert reported == list(itertools.accumulate(trial.user_attrs["dev_f1_per_epoch"], max))
    table = run(["dvc", "exp", "show", "--sort-by", "dvclive/train/metrics.json:best_dev_f1", "--sort-order", "desc",
                 "--only-changed", "--md"], root, env).stdout  # as the README shows it
    assert "tune-0" in table and "tune-1" in table and "best_dev_f1" in table
    markdown = (root / "reports" / "tune.md").read_text()
    assert f"dvc exp apply {report['best']['experiment']}" in markdown and "(best)" in markdown
    assert tracked_state(root, env) == before

    # resumed: the same study, one trial more, with rates of 0 (a model that cannot learn): pruned at epoch 1
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tune"] = tune_section(pruner="median", space={k: {"low": 0.0, "high": 0.0} for k in RATES} | {
        "epochs": {"choices": [3]}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = tracked_state(root, env)
    second = tune(root, env, "--trials", "3")
    assert "pruned" in second.stderr
    resumed = json.loads((root / "reports" / "tune.json").read_text())
    assert resumed["trials"][:2] == report["trials"]  # the earlier trials kept as they were
    pruned = resumed["trials"][2]
    assert (pruned["number"], pruned["state"], pruned["experiment"]) == (2, "PRUNED", None)
    assert len(pruned["dev_f1_per_epoch"]) == 1 and pruned["dev_f1_per_epoch"][0] < learned
    shown = experiments(json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout))
    assert {"tune-0", "tune-1"} <= set(shown) and "tune-2" not in shown  # a pruned trial commits nothing
    assert "tune-2" not in run(["git", "for-each-ref", "refs/exps"], root, env).stdout
    assert run_cache_entries(root) == run_cache  # no run-cache entry that a later run could restore
    assert not list((root / ".dvc" / "tmp" / "exps").glob("standalone/tmp*"))  # the stopped run's copy is gone
    assert tracked_state(root, env) == before
    for name in ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"):
        assert (root / "plots" / "tune" / f"{name}.png").stat().st_size > 1000, name

    # the best trial's params and model, applied with the one command the report gives
    best = resumed["best"]
    run(resumed["apply"].split(), root, env)
    applied = yaml.safe_load((root / "params.yaml").read_text())["train"]
    assert {k: applied[k] for k in best["params"]} == best["params"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_ctrl_c_stops_every_trial_running_side_by_side(project, pipeline_run):
    """Optuna runs parallel trials in worker threads, which never see Ctrl-C: the tuner must stop their trainings
    itself, or it would wait for both to train to the end (here 500 epochs)."""
    root, env = project, pipeline_run.env
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tune"] = tune_section(study="stopped", trials=4,
                                  space={"dropout": {"low": 0.0, "high": 0.2}, "epochs": {"choices": [500]}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "tune"], cwd=root, env=fresh_shell(env),
                            stderr=subprocess.PIPE, text=True)
    try:
        epochs: set[str] = set()
        for line in proc.stderr:  # type: ignore[union-attr]
            if " epoch 1/500: dev F1" in line:
                epochs.add(line.split(" epoch ")[0].rsplit(" ", 1)[1])
            if len(epochs) == 2:  # both trials are training
                break
        assert epochs == {"0", "1"}, "both trials train at once"
        trainers = descendants(proc.pid)
        assert len(trainers) >= 4  # two dvc runs, each with a stage shell and its python
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=180)[1]
        assert proc.returncode == 130, rest[-2000:]
        assert "tune interrupted; run it again to continue" in rest
        assert not [pid for pid in trainers if alive(pid)]
        report = json.loads((root / "reports" / "tune.json").read_text())
        assert [(t["state"], t["experiment"]) for t in report["trials"]] == [("FAIL", None)] * 2
        assert all("the tuner was interrupted" in t["error"] for t in report["trials"])
        assert not {"stopped-0", "stopped-1"} & set(experiments(json.loads(run(
            ["dvc", "exp", "show", "--json"], root, env).stdout)))
    finally:
        if proc.poll() is None:  # the test failed with the tuner still running
            for pid in descendants(proc.pid) | {proc.pid}:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        proc.wait()
        run(["git", "checkout", "params.yaml"], root, env)


@pytest.mark.parametrize(("space", "message"), [
    ({"lr_encoder": {"low": 1e-5, "high": 1e-4}, "batch": {"low": 8, "high": 32}},
     "tune.space.batch: not a key of the train section"),
    ({"lr_head": {"low": 1e-2, "high": 1e-3, "log": True}}, "tune.space.lr_head: low 0.01 > high 0.001"),
    ({"lr_crf": {"low": 0.0, "high": 0.1, "log": True}}, "tune.space.lr_crf: a log scale needs low > 0"),
    ({"lstm_hidden": {"low": 64, "high": 96.5}}, "tune.space.lstm_hidden: train.lstm_hidden is an integer"),
    ({"dropout": {"low": 0.0}}, "tune.space.dropout: needs low and high"),
])
def test_bad_tune_params_stop_with_one_line_naming_the_key(tmp_path, caplog, space, message):
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    params["tune"]["space"] = space
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with caplog.at_level(logging.ERROR, logger="pipeline"):
        assert main(["--params", str(tmp_path / "params.yaml"), "tune"]) == 2
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert message in record.getMessage() and "\n" not in record.getMessage()
    assert not (tmp_path / "reports").exists()


def test_a_resumed_study_refuses_a_space_that_changes_a_keys_kind(tmp_path):
    from pipeline.core.config import TuneConfig
    from pipeline.core.errors import ParamsError
    from pipeline.tuning.study import StudySetup, import_optuna, open_study, storage_url

    optuna = import_optuna()
    params = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    study = optuna.create_study(study_name="s", storage=storage_url("tune.db", tmp_path), direction="maximize")
    trial = study.ask({"lr_head": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    study.tell(trial, 0.5)
    params["tune"] = {"study": "s", "storage": "tune.db", "space": {"lr_head": {"choices": [1e-3, 1e-2]}}}
    setup = StudySetup(tmp_path, TuneConfig.from_params(params), params["train"], "dvclive/train", ())
    with pytest.raises(ParamsError, match=r"^tune\.space\.lr_head: the study s holds it as FloatDistribution"):
        open_study(setup)
    params["tune"]["space"] = {"lr_head": {"low": 1e-3, "high": 5e-2, "log": True}}  # a new range is fine
    assert len(open_study(StudySetup(tmp_path, TuneConfig.from_params(params), params["train"], "x", ())).trials) == 1


def test_the_chinese_pipeline_tunes_its_own_train_stage_with_its_own_params(tmp_path):
    """``--params pipelines/msra/params.yaml tune``: trials run pipelines/msra/dvc.yaml:train with keys set there."""
    from pipeline.core.config import TuneConfig
    from pipeline.tuning.study import StudySetup, import_optuna, open_study

    root = Path(__file__).parents[1]
    params = yaml.safe_load((root / "pipelines" / "msra" / "params.yaml").read_text())
    params["tune"]["storage"] = str(tmp_path / "tune.db")
    setup = StudySetup(root, TuneConfig.from_params(params), params["train"], params["paths"]["train_live"], (),
                       params_file="pipelines/msra/params.yaml")
    assert setup.target() == "pipelines/msra/dvc.yaml:train"
    assert setup.key("lr_head") == "pipelines/msra/params.yaml:train.lr_head"
    assert set(setup.distributions(import_optuna())) == set(params["tune"]["space"])  # every key a train key
    assert open_study(setup).study_name == "tune-msra"
    main_setup = StudySetup(root, TuneConfig.from_params(params), params["train"], "x", ())
    assert (main_setup.target(), main_setup.key("lr_head")) == ("train", "train.lr_head")


def test_the_report_marks_the_best_gives_its_apply_command_and_draws_the_plots(tmp_path):
    from pipeline.core.config import TuneConfig
    from pipeline.tuning.report import write_plots, write_report
    from pipeline.tuning.study import import_optuna

    optuna = import_optuna()
    study = optuna.create_study(direction="maximize")
    rate = optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    for number, (value, curve, state) in enumerate([(0.5, [0.3, 0.5], "COMPLETE"), (0.6, [0.4, 0.6], "COMPLETE"),
                                                    (None, [0.1], "PRUNED")]):
        trial = study.ask({"lr_encoder": rate})
        trial.set_user_attr("experiment", f"tune-{number}")
        for epoch, f1 in enumerate(curve, 1):
            trial.report(f1, epoch)
        study.tell(trial, value, state=getattr(optuna.trial.TrialState, state))
    conf = TuneConfig.from_params({"train": {"lr_encoder": 5e-5}, "tune": {"space": {
        "lr_encoder": {"low": 1e-5, "high": 1e-3, "log": True}}}})
    data = write_report(study, conf, tmp_path / "tune.md", tmp_path / "tune.json")
    assert data["apply"] == "dvc exp apply tune-1" and data["best"]["number"] == 1
    assert [t["dev_f1"] for t in data["trials"]] == [0.5, 0.6, None]  # a pruned trial has no final score
    rows = [line for line in (tmp_path / "tune.md").read_text().splitlines() if line.startswith("| ")]
    assert rows[3].startswith("| **1 (best)** | complete | **0.6000** | 0.400 0.600 |")
    assert rows[4].startswith("| 2 | pruned | — | 0.100 |") and rows[4].endswith("| — |")
    assert json.loads((tmp_path / "tune.json").read_text()) == data
    written = write_plots(study, tmp_path / "plots")
    assert [p.name for p in written] == ["optimization_history.png", "param_importances.png",
                                         "parallel_coordinate.png", "intermediate_values.png"]
