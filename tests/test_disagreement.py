import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ensdiv.disagreement import (
    SCORE_NAMES,
    SCORES,
    DisagreementDetector,
    auroc,
    calibrate_threshold,
    evaluate_detector,
    js_divergence,
    max_prob_deficit,
    mean_kl_to_mean,
    prob_variance,
    vote_disagreement,
)
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError

BIG = 60.0  # logits this far apart are one-hot in float32


def onehot_logits(classes, k=4):
    """[M, 1, K] logits of members each certain of one class."""
    z = torch.zeros(len(classes), 1, k)
    for m, c in enumerate(classes):
        z[m, 0, c] = BIG
    return z


@pytest.mark.parametrize("score", SCORE_NAMES)
def test_agreeing_members_score_zero_or_the_confidence_floor(score):
    z = onehot_logits([2, 2, 2])
    assert float(SCORES[score](z)) == pytest.approx(0.0, abs=1e-6)
    # identical but uncertain members: disagreement scores stay 0, the confidence one does not
    soft = torch.randn(1, 5, 4).repeat(3, 1, 1)
    s = SCORES[score](soft)
    assert s.shape == (5,)
    if score == "max_prob_deficit":
        assert bool((s > 0).all())
    else:
        assert torch.allclose(s, torch.zeros(5), atol=1e-6)


def test_known_values_and_maxima():
    three = onehot_logits([0, 1, 2])
    assert float(vote_disagreement(three)) == pytest.approx(2 / 3)
    assert float(mean_kl_to_mean(three)) == pytest.approx(math.log(3), abs=1e-5)  # max log M
    assert float(js_divergence(three)) == pytest.approx(math.log(2), abs=1e-5)  # max log 2
    assert float(max_prob_deficit(three)) == pytest.approx(2 / 3, abs=1e-6)
    two = onehot_logits([0, 1])
    assert float(prob_variance(two)) == pytest.approx(0.25, abs=1e-6)  # the maximum
    two_of_three = onehot_logits([1, 1, 3])
    assert float(vote_disagreement(two_of_three)) == pytest.approx(1 / 3)
    # prob of class 1 across members: 1, 1, 0 -> variance 2/9
    assert float(prob_variance(two_of_three)) == pytest.approx(2 / 9, abs=1e-6)
    assert float(js_divergence(onehot_logits([3]))) == 0.0


def test_mean_kl_is_the_mutual_information_against_a_float64_reference():
    z = torch.randn(4, 7, 5, dtype=torch.float64)
    p = torch.softmax(z, -1)
    pbar = p.mean(0)
    ent = lambda q: -(q * q.log()).sum(-1)  # noqa: E731
    mi = ent(pbar) - ent(p).mean(0)
    torch.testing.assert_close(mean_kl_to_mean(z), mi)
    # pairwise JSD by its definition
    jsd = []
    for i in range(4):
        for j in range(i + 1, 4):
            mid = (p[i] + p[j]) / 2
            jsd.append(0.5 * ((p[i] * (p[i] / mid).log()).sum(-1)
                              + (p[j] * (p[j] / mid).log()).sum(-1)))
    torch.testing.assert_close(js_divergence(z), torch.stack(jsd).mean(0))


@pytest.mark.parametrize("score", [s for s in SCORE_NAMES if s != "vote_disagreement"])
def test_differentiable_scores_have_gradients(score):
    z = torch.randn(3, 4, 5, requires_grad=True)
    SCORES[score](z).sum().backward()
    assert z.grad is not None and bool(torch.isfinite(z.grad).all())


def test_scores_reject_bad_logits():
    with pytest.raises(EnsdivError, match=r"\[M, B, K\]"):
        mean_kl_to_mean(torch.zeros(3, 4))


def test_auroc_equals_sklearn():
    g = np.random.default_rng(0)
    for _ in range(5):
        c, a = g.normal(size=40), g.normal(0.5, 1, size=30)
        c[:5] = a[:5]  # ties across the sets
        want = roc_auc_score(np.r_[np.zeros(40), np.ones(30)], np.r_[c, a])
        assert auroc(torch.tensor(c), torch.tensor(a)) == pytest.approx(want)
    assert math.isnan(auroc(torch.tensor([]), torch.tensor([1.0])))


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.33])
def test_threshold_is_the_smallest_with_fpr_at_most_target(fpr):
    s = torch.randn(500)
    t = calibrate_threshold(s, fpr)
    flagged = int((s > t).sum())
    assert flagged <= fpr * 500 < flagged + 1  # at most fpr, and within one sample of it
    lower = s[s < t].max()  # the next smaller candidate breaks the target
    assert int((s > lower).sum()) > fpr * 500
    # ties can only lower the realized rate
    tied = torch.tensor([0.0] * 90 + [1.0] * 10)
    assert calibrate_threshold(tied, 0.05) == 1.0


def test_detector_fit_detect_save_load(tmp_path):
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=4, seed=0).eval()
    det = DisagreementDetector(ens, score="js_divergence")
    x = torch.rand(30, 1, 8, 8)
    with pytest.raises(EnsdivError, match="call fit"):
        det.detect(x)
    with pytest.raises(EnsdivError, match="call fit"):
        det.save(tmp_path / "d.pt")
    calib = torch.rand(200, 1, 8, 8)
    det.fit(calib, fpr=0.1)
    assert int(det.detect(calib).sum()) <= 20
    flags = det.detect(x)
    assert flags.dtype == torch.bool and flags.shape == (30,)
    det.fit(torch.utils.data.TensorDataset(calib, torch.zeros(200, dtype=torch.long)), fpr=0.1)
    assert torch.equal(det.detect(x), flags)  # a dataset gives the same threshold
    det.save(tmp_path / "d.pt")
    back = DisagreementDetector.load(tmp_path / "d.pt", ens)
    assert back.threshold == det.threshold and back.score_name == "js_divergence"
    assert torch.equal(back.detect(x), flags)
    other = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=4, seed=1)
    with pytest.raises(EnsdivError, match="different ensemble"):
        DisagreementDetector.load(tmp_path / "d.pt", other)
    (tmp_path / "bad.pt").write_bytes(b"junk")
    with pytest.raises(EnsdivError, match="bad.pt"):
        DisagreementDetector.load(tmp_path / "bad.pt", ens)


@pytest.mark.parametrize("kwargs, match", [
    ({"score": "entropy"}, "unknown score 'entropy'"),
])
def test_detector_bad_arguments(kwargs, match):
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=4, seed=0)
    with pytest.raises(EnsdivError, match=match):
        DisagreementDetector(ens, **kwargs)
    with pytest.raises(EnsdivError, match="needs an Ensemble"):
        DisagreementDetector(torch.nn.Linear(2, 2))
    det = DisagreementDetector(ens)
    with pytest.raises(EnsdivError, match=r"fpr must be in \(0, 1\)"):
        det.fit(torch.rand(10, 1, 8, 8), fpr=1.5)
    with pytest.raises(EnsdivError, match="shape"):
        det.fit(torch.rand(10, 1, 28, 28))


class FixedMembers(Ensemble):
    """An ensemble whose member logits are given per input index (stored in pixel 0)."""

    def __init__(self, table):
        super().__init__([torch.nn.Linear(1, 1)])
        self.table = table  # [N, M, K]

    def member_logits(self, x):
        idx = (x.flatten(1)[:, 0] * 100).round().long()
        return self.table[idx].transpose(0, 1)


def test_detection_aware_robust_accuracy_on_a_hand_made_case():
    # 4 inputs, 3 members, 3 classes. Clean: 0, 1, 2 correct; 3 wrong. Adversarial versions:
    # a0 misclassified and members disagree (flagged), a1 misclassified and agreeing (missed),
    # a2 still correct, a3 (clean wrong) anything.
    agree = lambda c: [[BIG if k == c else 0.0 for k in range(3)]] * 3  # noqa: E731
    split = [[BIG, 0, 0], [0, BIG, 0], [0, 0, BIG]]
    table = torch.tensor([agree(0), agree(1), agree(2), agree(1),     # clean 0..3
                          [[0, BIG, 0], [0, BIG, 0], [BIG, 0, 0]],     # a0: 2 vote 1 -> wrong
                          agree(2), agree(2), agree(0)])              # a1 wrong, a2 right, a3
    table[4] = torch.tensor(split)[[1, 1, 0]]
    table[4, 2] = torch.tensor([0, 0, BIG])  # a0: votes 1, 1, 2 -> class 1, disagreement
    ens = FixedMembers(table)
    det = DisagreementDetector.__new__(DisagreementDetector)
    det.ensemble, det.score_name, det.threshold, det.fpr, det.n_calibration = \
        ens, "vote_disagreement", 0.1, 0.05, 0
    clean = (torch.arange(4, dtype=torch.float32) / 100).view(4, 1, 1, 1)
    adv = ((torch.arange(4, dtype=torch.float32) + 4) / 100).view(4, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 0])
    r = evaluate_detector(det, clean, y, adv)
    assert (r.n, r.n_correct, r.n_success) == (4, 3, 2)  # a0 and a1 succeed
    assert r.n_flagged_success == 1 and r.tpr == 0.5
    assert r.clean_acc == 0.75 and r.robust_acc == 0.25  # only input 2 survives
    assert r.detection_robust_acc == 0.5  # input 2 (correct) and input 0 (flagged)
    assert r.attack_success == pytest.approx(2 / 3)
    assert r.undetected_success == pytest.approx(1 / 3)
    assert r.fpr == 0.0 and r.auroc == pytest.approx(0.75)  # scores: clean 0,0,0; adv 1/3, 0
