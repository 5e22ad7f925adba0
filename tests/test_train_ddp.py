"""Two CPU processes under torchrun (gloo) train the same model as one process, within float tolerance."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import make_train_project

pytestmark = pytest.mark.slow


def no_dropout_encoder(tiny_encoder: Path, out: Path) -> Path:
    """Dropout masks differ between a 2-rank and a 1-rank run; without them the runs must agree."""
    shutil.copytree(tiny_encoder, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_two_process_ddp_matches_one_process(tmp_path, tiny_encoder):
    encoder = no_dropout_encoder(tiny_encoder, tmp_path / "encoder")
    settings = dict(epochs=1, batch_size=8, dropout=0.0, lstm_hidden=16, lr_encoder=1e-3, threads=1)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    for project in (single, ddp):
        make_train_project(project, encoder, 120, **settings)
    one = subprocess.run([sys.executable, "-m", "pipeline", "train"], cwd=single, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "train"],
                         cwd=ddp, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 1 of 2" in two.stderr

    # same number of optimizer steps, logged once (rank 0 only)
    def steps(project):
        return (project / "dvclive" / "train" / "plots" / "metrics" / "train" / "loss.tsv").read_text().count("\n")
    assert steps(single) == steps(ddp) > 5

    a = load_file(str(single / "models" / "best" / "model.safetensors"))
    b = load_file(str(ddp / "models" / "best" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)
    start = load_file(str(encoder / "model.safetensors"))["bert.encoder.layer.0.output.dense.weight"]
    trained = a["bert.encoder.layer.0.output.dense.weight"]
    assert (trained - start).abs().max().item() > 100 * (a["bert.encoder.layer.0.output.dense.weight"] -
                                                           b["bert.encoder.layer.0.output.dense.weight"]).abs().max()


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("batch", [[5], [1, 2], [3, 4, 5, 6, 7]])
def test_ranks_split_each_batch_and_weigh_it_to_the_global_mean(size, batch):
    from pipeline.modeling.distributed import World

    shards = [World(rank, size, torch.device("cpu")).shard(batch) for rank in range(size)]
    real = [(mine, w) for mine, w in shards if w]
    assert sorted(i for mine, _ in real for i in mine) == sorted(batch)  # each example on exactly one rank
    # DDP averages over ranks: sum(weight * examples) / size must be 1, i.e. the batch mean
    assert sum(w * len(mine) for mine, w in real) / size == pytest.approx(1.0)
    assert all(mine for mine, _ in shards)  # every rank still runs a forward pass
