"""Model construction, pretrained-weight loading, and optimizer groups."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.errors import ModelLoadError
from pipeline.modeling.model import HeadConfig, LengthAwareBiLSTM, build_model, gather_rows, load_encoder_weights
from pipeline.modeling.optim import build_optimizer, build_scheduler


def test_pretrained_weights_load_into_the_encoder_built_from_config(tiny_encoder):
    model = build_model(tiny_encoder, HeadConfig(num_tags=5, lstm_hidden=8))
    saved = load_file(str(tiny_encoder / "model.safetensors"))
    name = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(model.bert.state_dict()[name[len("bert."):]], saved[name])
    fresh = build_model(tiny_encoder, HeadConfig(num_tags=5, lstm_hidden=8), pretrained=False)
    assert not torch.equal(fresh.bert.state_dict()[name[len("bert."):]], saved[name])


def test_heads_are_ignored_and_a_missing_encoder_weight_is_an_error(tiny_encoder, tmp_path):
    model = build_model(tiny_encoder, HeadConfig(num_tags=5, lstm_hidden=8), pretrained=False)
    report = load_encoder_weights(model.bert, tiny_encoder)
    assert any(k.startswith("cls.") for k in report["ignored"])
    state = load_file(str(tiny_encoder / "model.safetensors"))
    del state["bert.encoder.layer.0.output.dense.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"encoder\.layer\.0\.output\.dense\.weight"):
        load_encoder_weights(model.bert, tmp_path)


def test_pytorch_model_bin_without_prefix_loads(tiny_encoder, tmp_path):
    state = {k[len("bert."):]: v for k, v in load_file(str(tiny_encoder / "model.safetensors")).items()
             if k.startswith("bert.")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = build_model(tiny_encoder, HeadConfig(num_tags=5, lstm_hidden=8), pretrained=False)
    load_encoder_weights(model.bert, tmp_path)
    assert torch.equal(model.bert.embeddings.word_embeddings.weight, state["embeddings.word_embeddings.weight"])


def test_bilstm_output_does_not_depend_on_padding():
    torch.manual_seed(0)
    lstm = LengthAwareBiLSTM(6, 5, num_layers=2, dropout=0.0).eval()
    x = torch.randn(1, 4, 6)
    alone = lstm(x, torch.tensor([4]))
    padded = torch.cat([x, torch.randn(1, 7, 6)], dim=1)
    batch = torch.cat([padded, torch.randn(1, 11, 6)])
    together = lstm(batch, torch.tensor([4, 11]))
    torch.testing.assert_close(together[0, :4], alone[0])


def test_row_gather_equals_torch_gather_in_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, requires_grad=True)
    index = torch.tensor([[0, 2, 6, 0], [1, 1, 0, 0], [6, 5, 4, 3]])  # repeats, as padded word indices are
    expanded = torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, 5))
    rows = gather_rows(x, index)
    assert torch.equal(rows, expanded)
    weights = torch.randn(3, 4, 5)
    assert torch.equal(torch.autograd.grad((rows * weights).sum(), x)[0],
                       torch.autograd.grad((expanded * weights).sum(), x)[0])


def test_optimizer_groups_rates_and_no_decay_on_bias_and_layernorm(tiny_encoder):
    model = build_model(tiny_encoder, HeadConfig(num_tags=5, lstm_hidden=8))
    opt = build_optimizer(model, lr_encoder=2e-5, lr_head=1e-3, lr_crf=1e-2, weight_decay=0.01, layer_decay=0.5)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name.endswith(".bias") or "LayerNorm" in name or name.startswith("crf."):
                assert group["weight_decay"] == 0.0, name
            if name.startswith("crf."):
                assert group["lr"] == 1e-2
            elif name.startswith(("lstm.", "classifier.")):
                assert group["lr"] == 1e-3
            elif ".embeddings." in name:
                assert group["lr"] == pytest.approx(2e-5 * 0.5 ** 2)  # two layers below the top
            elif ".layer.1." in name:
                assert group["lr"] == pytest.approx(2e-5)
    assert opt.defaults["eps"] == 1e-8
    covered = sum(len(g["params"]) for g in opt.param_groups)
    assert covered == len(list(model.parameters()))


def test_linear_warmup_reaches_peak_at_the_warmup_share():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = build_scheduler(opt, "linear", total_steps=100, warmup=0.1)
    rates = []
    for _ in range(100):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[0] == 0.0 and rates[10] == pytest.approx(1.0) and rates[5] == pytest.approx(0.5)
    assert rates[-1] < 0.02
