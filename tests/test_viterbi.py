import itertools

import numpy as np
import pytest
import torch
from torchcrf import CRF

from pipeline.runtime.viterbi import CrfParams, marginals, viterbi_decode


def random_crf(num_tags: int, seed: int) -> tuple[CRF, CrfParams]:
    torch.manual_seed(seed)
    crf = CRF(num_tags, batch_first=True)
    for p in crf.parameters():
        torch.nn.init.normal_(p, std=2.0)
    params = CrfParams(crf.start_transitions.detach().numpy(), crf.end_transitions.detach().numpy(),
                       crf.transitions.detach().numpy())
    return crf, params


@pytest.mark.parametrize("seed", range(5))
def test_numpy_viterbi_equals_torchcrf_decode_with_ragged_masks(seed):
    rng = np.random.default_rng(seed)
    crf, params = random_crf(num_tags=7, seed=seed)
    batch, steps = 9, 13
    lengths = rng.integers(1, steps + 1, size=batch)
    lengths[0] = steps
    mask = np.arange(steps)[None, :] < lengths[:, None]
    emissions = rng.normal(scale=3.0, size=(batch, steps, 7)).astype(np.float32)
    expected = crf.decode(torch.from_numpy(emissions), mask=torch.from_numpy(mask))
    paths, _ = viterbi_decode(emissions, mask, params)
    assert paths == expected


def test_numpy_viterbi_breaks_ties_like_torchcrf():
    """Scores of -1, 0 and 1 everywhere: many paths tie, and each tie must go the same way as torchcrf's."""
    for seed in range(50):
        rng = np.random.default_rng(seed)
        crf, params = random_crf(num_tags=5, seed=seed)
        with torch.no_grad():
            for p in crf.parameters():
                p.copy_(torch.from_numpy(rng.integers(-1, 2, size=tuple(p.shape)).astype(np.float32)))
        params = CrfParams(crf.start_transitions.detach().numpy(), crf.end_transitions.detach().numpy(),
                           crf.transitions.detach().numpy())
        lengths = rng.integers(1, 10, size=7)
        lengths[0] = 9
        mask = np.arange(9)[None, :] < lengths[:, None]
        emissions = rng.integers(-1, 2, size=(7, 9, 5)).astype(np.float32)
        paths, _ = viterbi_decode(emissions, mask, params)
        assert paths == crf.decode(torch.from_numpy(emissions), mask=torch.from_numpy(mask)), seed


def test_marginals_and_partition_match_brute_force():
    rng = np.random.default_rng(0)
    crf, params = random_crf(num_tags=3, seed=1)
    steps = 4
    emissions = rng.normal(size=(2, steps, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)
    probs, log_z = marginals(emissions, mask, params)
    for b in range(2):
        n = int(mask[b].sum())
        scores = {}
        for path in itertools.product(range(3), repeat=n):
            s = params.start[path[0]] + params.end[path[-1]] + sum(emissions[b, t, path[t]] for t in range(n))
            s += sum(params.transitions[path[t - 1], path[t]] for t in range(1, n))
            scores[path] = float(s)
        z = np.logaddexp.reduce(list(scores.values()))
        assert log_z[b] == pytest.approx(z, abs=1e-4)
        # torchcrf's normalizer agrees too
        torch_z = crf._compute_normalizer(torch.from_numpy(emissions[b:b + 1, :n]).transpose(0, 1),
                                          torch.ones(n, 1, dtype=torch.bool))
        assert float(torch_z.detach()) == pytest.approx(z, abs=1e-4)
        for t in range(n):
            for k in range(3):
                p = sum(np.exp(s - z) for path, s in scores.items() if path[t] == k)
                assert probs[b, t, k] == pytest.approx(p, abs=1e-5)
        assert np.allclose(probs[b, :n].sum(axis=1), 1.0)
        assert np.all(probs[b, n:] == 0)


def log_space_marginals(emissions: np.ndarray, crf: CrfParams) -> tuple[np.ndarray, float]:
    """Textbook forward-backward in log space for one unpadded sequence: the reference."""
    steps, tags = emissions.shape
    alpha, beta = np.empty((steps, tags)), np.empty((steps, tags))
    trans = crf.transitions.astype(np.float64)
    alpha[0] = crf.start + emissions[0]
    for t in range(1, steps):
        alpha[t] = np.logaddexp.reduce(alpha[t - 1][:, None] + trans, axis=0) + emissions[t]
    beta[-1] = crf.end
    for t in range(steps - 2, -1, -1):
        beta[t] = np.logaddexp.reduce(trans + (emissions[t + 1] + beta[t + 1])[None, :], axis=1)
    log_z = float(np.logaddexp.reduce(alpha[-1] + crf.end))
    return np.exp(alpha + beta - log_z), log_z


@pytest.mark.parametrize("seed", range(8))
def test_marginals_match_log_space_on_ragged_batches_with_forbidden_transitions(seed):
    rng = np.random.default_rng(seed)
    tags, batch, steps = int(rng.integers(3, 22)), int(rng.integers(1, 7)), int(rng.integers(1, 50))
    transitions = rng.normal(size=(tags, tags)) * 2
    transitions[rng.random((tags, tags)) < 0.3] = -1e4  # as constrain_transitions pins them
    np.fill_diagonal(transitions, 0.5)
    crf = CrfParams(rng.normal(size=tags).astype(np.float32), rng.normal(size=tags).astype(np.float32),
                    transitions.astype(np.float32))
    emissions = (rng.normal(size=(batch, steps, tags)) * [1, 5, 30][seed % 3]).astype(np.float32)
    lengths = rng.integers(1, steps + 1, size=batch)
    mask = np.arange(steps)[None, :] < lengths[:, None]
    probs, log_z = marginals(emissions, mask, crf)
    for b in range(batch):
        n = int(lengths[b])
        want, want_z = log_space_marginals(emissions[b, :n].astype(np.float64), crf)
        assert log_z[b] == pytest.approx(want_z, rel=1e-9, abs=1e-6)
        np.testing.assert_allclose(probs[b, :n], want, atol=1e-8)
        assert np.all(probs[b, n:] == 0)


def test_marginals_stay_finite_on_a_20000_step_text():
    rng = np.random.default_rng(0)
    crf = CrfParams(*(rng.normal(size=s).astype(np.float32) for s in ((21,), (21,), (21, 21))))
    emissions = (rng.normal(size=(1, 20_000, 21)) * 10).astype(np.float32)
    probs, log_z = marginals(emissions, np.ones((1, 20_000), dtype=bool), crf)
    assert np.isfinite(log_z).all() and np.isfinite(probs).all()
    np.testing.assert_allclose(probs.sum(axis=2), 1.0, atol=1e-9)
    want, want_z = log_space_marginals(emissions[0].astype(np.float64), crf)
    assert log_z[0] == pytest.approx(want_z, rel=1e-9)
    np.testing.assert_allclose(probs[0], want, atol=1e-7)
