import itertools

import numpy as np
import pytest
import torch
from torchcrf import CRF

from pipeline.viterbi import CrfParams, marginals, viterbi_decode


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
