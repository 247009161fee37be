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


def _authors_log_ed(probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """log ED as the authors compute it: each member's probabilities without the true class,
    divided by their raw norm, the log-determinant of the ridged Gram matrix (float64)."""
    out = []
    for b in range(probs.shape[1]):
        rest = np.delete(probs[:, b], int(y[b]), axis=1)
        unit = rest / np.linalg.norm(rest, axis=1, keepdims=True)
        sign, value = np.linalg.slogdet(unit @ unit.T + DET_OFFSET * np.eye(len(unit)))
        assert sign > 0
        out.append(value)
    return np.array(out)


@pytest.mark.parametrize("margin", [0.0, 5.0, 29.0, 40.0, 80.0, 120.0, 200.0])
def test_log_ed_and_its_gradient_stay_right_at_large_margins(margin):
    """The same members' non-maximal predictions at growing true-class margins: float32 log ED
    and its gradient against the authors' raw-norm formula in float64 (where the probabilities
    still exist: e^-200 ≈ 1e-87). In float32 the raw norm loses them past ~29 logits."""
    g = torch.Generator().manual_seed(0)
    wrong = torch.randn(3, 4, 9, generator=g, dtype=torch.float64)  # M = 3, B = 4, 9 wrong
    y = torch.tensor([0, 3, 5, 9])
    logits64 = torch.empty(3, 4, 10, dtype=torch.float64)
    for b, c in enumerate(y.tolist()):
        rest = [k for k in range(10) if k != c]
        logits64[:, b, rest] = wrong[:, b]
        logits64[:, b, c] = wrong[:, b].max(-1).values + margin
    ref_in = logits64.clone().requires_grad_(True)
    probs = torch.softmax(ref_in, -1)
    keep = torch.ones(4, 10, dtype=torch.bool)
    keep[torch.arange(4), y] = False
    rest = probs[:, keep].reshape(3, 4, 9)
    unit = rest / rest.norm(dim=-1, keepdim=True)  # the authors' raw norm, in float64
    gram = torch.einsum("mbk,nbk->bmn", unit, unit)
    want = torch.logdet(gram + DET_OFFSET * torch.eye(3, dtype=torch.float64))
    want.sum().backward()
    got_in = logits64.float().requires_grad_(True)
    got = log_ensemble_diversity(got_in, y)
    got.sum().backward()
    # float32 round-off of a log-determinant of a Gram matrix with entries in [0, 1]: ~1e-6
    # relative on each entry, magnified by the ridged Gram's condition (< 1e3 here)
    assert got.detach().double().numpy() == pytest.approx(want.detach().numpy(), abs=1e-3)
    scale = ref_in.grad.abs().max()
    assert (got_in.grad.double() - ref_in.grad).abs().max() <= 1e-3 * scale + 1e-6


def test_orthonormal_non_maximal_predictions_have_ed_one():
    # true class 0; the members put their wrong mass on disjoint classes
    p = torch.zeros(3, 1, 5, dtype=torch.float64)
    p[:, 0, 0] = 0.4
    p[0, 0, 1] = p[1, 0, 2] = p[2, 0, 3] = 0.6
    led = log_ensemble_diversity(p.log(), torch.tensor([0]))  # log 0 = -inf: softmax gives 0
    assert float(led) == pytest.approx(3 * math.log1p(DET_OFFSET), abs=1e-12)


def test_equal_predictions_drive_ed_to_zero():
    p = torch.softmax(torch.randn(1, 4, 10, dtype=torch.float64), -1).expand(3, 4, 10)
    led = log_ensemble_diversity(p.log(), torch.arange(4))
    # Gram = all ones: eigenvalues 3 + r, r, r -> log det = log(3 + r) + 2 log r
    expected = math.log(3 + DET_OFFSET) + 2 * math.log(DET_OFFSET)
    assert torch.allclose(led, torch.full((4,), expected, dtype=torch.float64))
    assert math.exp(expected) < 1e-10


def test_log_ed_matches_numpy_on_random_predictions():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(4, 6, 10, dtype=torch.float64), -1)
    y = torch.randint(0, 10, (6,))
    got = log_ensemble_diversity(probs.log(), y).numpy()
    assert got == pytest.approx(_authors_log_ed(probs.numpy(), y.numpy()), rel=1e-10)


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
    led = torch.tensor(_authors_log_ed(probs.detach().double().numpy(), y.numpy())).mean()
    want = ce - 2.0 * ensemble_entropy(probs).mean() - 0.5 * led.float()
    assert torch.allclose(loss, want, atol=1e-5)
    assert set(parts) == {"ce_0", "ce_1", "ce_2", "reg", "entropy", "log_ed"}
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ens.parameters())


def test_the_regularizer_rewards_diverse_wrong_predictions():
    y = torch.tensor([0])
    same = torch.tensor([[[0.7, 0.3, 0.0, 0.0]]] * 3)
    spread = torch.tensor([[[0.7, 0.3, 0.0, 0.0]], [[0.7, 0.0, 0.3, 0.0]],
                           [[0.7, 0.0, 0.0, 0.3]]])
    assert adp_regularizer(spread.log(), y)[0] < adp_regularizer(same.log(), y)[0]


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
