"""CPU training's cheaper dropout (pipeline/modeling/dropout.py, attention.py): same statistics, same maths."""

import pytest
import torch

from pipeline.modeling import attention
from pipeline.modeling.dropout import FastDropout, fast_dropout
from pipeline.modeling.model import HeadConfig, build_model


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_fast_dropout_keeps_the_share_it_should_and_the_expected_value(p):
    torch.manual_seed(0)
    x = torch.rand(4_000_000) + 1.0  # no zeros of its own; at this size 0.01 is over 6 standard errors
    y = fast_dropout(x, p)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.002
    ratio = y[kept] / x[kept]  # every kept value scaled by one factor, 1 / (1 - p) up to 16-bit rounding of p
    assert torch.allclose(ratio, ratio[0].expand_as(ratio)) and abs(ratio[0].item() * (1 - p) - 1) < 1e-4
    assert abs(y.mean().item() / x.mean().item() - 1) < 0.01


def test_fast_dropout_is_seeded_and_its_gradient_is_its_mask():
    x = torch.randn(32, 40, 384, requires_grad=True)
    torch.manual_seed(1)
    y = fast_dropout(x, 0.1)
    torch.manual_seed(1)
    assert torch.equal(fast_dropout(x, 0.1), y)
    y.sum().backward()
    kept = y != 0
    assert torch.allclose(x.grad, kept * (y[kept] / x[kept])[0])  # one scale where kept, zero where dropped
    assert not torch.equal(fast_dropout(x, 0.1), y)  # a new draw


def test_fast_dropout_is_the_identity_in_eval_and_nn_dropouts_end_at_p_0_and_1():
    module = FastDropout(0.3)
    x = torch.randn(8, 8)
    assert torch.equal(module.eval()(x), x)
    module.train()
    assert torch.equal(FastDropout(0.0).train()(x), x)
    assert torch.equal(FastDropout(1.0).train()(x), torch.zeros_like(x))


def test_the_model_uses_it_everywhere_and_training_attention_is_sdpa_without_dropout(tiny_encoder, monkeypatch):
    model = build_model(tiny_encoder, HeadConfig(num_tags=5, lstm_hidden=8))
    assert not [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert model.bert.config._attn_implementation == attention.NAME
    ids = torch.tensor([[101, 7, 8, 9, 102], [101, 7, 102, 0, 0]])
    mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    with torch.no_grad():
        expected = model.bert.eval()(input_ids=ids, attention_mask=mask).last_hidden_state  # SDPA, no dropout
        attention_dropouts = {id(layer.attention.self.dropout) for layer in model.bert.encoder.layer}
        for m in model.modules():
            if isinstance(m, FastDropout) and id(m) not in attention_dropouts:
                m.p = 0.0  # hidden dropouts off; attention reads its own p, so its CPU training path runs
        monkeypatch.setattr(attention, "fast_dropout", lambda x, p: x)
        got = model.bert.train()(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got[0], expected[0], atol=1e-5)
    assert torch.allclose(got[1, :3], expected[1, :3], atol=1e-5)  # padding masked on the training path too
