import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from ensdiv.adp import (
    DET_OFFSET,
    adp_loss,
    adp_regularizer,
    ensemble_entropy,
    log_ensemble_diversity,
)
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError


def test_orthonormal_non_maximal_predictions_have_ed_one():
    # true class 0; the members put their wrong mass on disjoint classes
    p = torch.zeros(3, 1, 5, dtype=torch.float64)
    p[:, 0, 0] = 0.4
    p[0, 0, 1] = p[1, 0, 2] = p[2, 0, 3] = 0.6
    led = log_ensemble_diversity(p, torch.tensor([0]))
    assert float(led) == pytest.approx(3 * math.log1p(DET_OFFSET), abs=1e-12)


def test_equal_predictions_drive_ed_to_zero():
    p = torch.softmax(torch.randn(1, 4, 10, dtype=torch.float64), -1).expand(3, 4, 10)
    led = log_ensemble_diversity(p, torch.arange(4))
    # Gram = all ones: eigenvalues 3 + r, r, r -> log det = log(3 + r) + 2 log r
    expected = math.log(3 + DET_OFFSET) + 2 * math.log(DET_OFFSET)
    assert torch.allclose(led, torch.full((4,), expected, dtype=torch.float64))
    assert math.exp(expected) < 1e-10


def test_log_ed_matches_numpy_on_random_predictions():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 6, 10, dtype=torch.float64), -1)
    y = torch.randint(0, 10, (6,))
    got = log_ensemble_diversity(probs, y).numpy()
    for b in range(6):
        rest = np.delete(probs[:, b].numpy(), int(y[b]), axis=1)
        unit = rest / np.linalg.norm(rest, axis=1, keepdims=True)
        sign, want = np.linalg.slogdet(unit @ unit.T + DET_OFFSET * np.eye(4))
        assert sign > 0 and got[b] == pytest.approx(want, rel=1e-10)


def test_entropy_matches_scipy():
    probs = torch.softmax(torch.randn(3, 5, 7, dtype=torch.float64), -1)
    want = [stats.entropy(probs.mean(0)[b].numpy()) for b in range(5)]
    assert np.allclose(ensemble_entropy(probs).numpy(), want, atol=1e-12)


def test_adp_loss_is_its_definition_and_trains():
    torch.manual_seed(0)
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss, parts = adp_loss(ens, x, y, alpha=2.0, beta=0.5)
    logits = torch.stack([m(x) for m in ens.members])
    ce = sum(F.cross_entropy(z, y) for z in logits)
    probs = torch.softmax(logits, -1)
    want = ce - 2.0 * ensemble_entropy(probs).mean() - 0.5 * log_ensemble_diversity(probs, y).mean()
    assert torch.allclose(loss, want, atol=1e-5)
    assert set(parts) == {"ce_0", "ce_1", "ce_2", "reg", "entropy", "log_ed"}
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ens.parameters())


def test_the_regularizer_rewards_diverse_wrong_predictions():
    y = torch.tensor([0])
    same = torch.tensor([[[0.7, 0.3, 0.0, 0.0]]] * 3)
    spread = torch.tensor([[[0.7, 0.3, 0.0, 0.0]], [[0.7, 0.0, 0.3, 0.0]],
                           [[0.7, 0.0, 0.0, 0.3]]])
    assert adp_regularizer(spread, y)[0] < adp_regularizer(same, y)[0]


@pytest.mark.parametrize("kwargs, match", [({"alpha": -1.0}, "ADP alpha"),
                                           ({"beta": float("nan")}, "ADP beta"),
                                           ({"beta": float("inf")}, "ADP beta")])
def test_bad_weights_are_one_error(kwargs, match):
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match=match):
        adp_loss(ens, torch.rand(2, 1, 8, 8), torch.arange(2), **kwargs)


def test_one_member_is_refused():
    ens = Ensemble.build("mlp", 1, in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match="at least 2 members"):
        adp_loss(ens, torch.rand(2, 1, 8, 8), torch.arange(2))
