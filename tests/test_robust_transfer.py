import pytest
import torch
from torch import nn

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.objective import TransferLoss, ensemble_loss
from ensdiv.robust_transfer import Teacher, crt_loss, rrm_loss


def test_rrm_loss_on_hand_made_features():
    s = torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 4.0]])
    assert float(rrm_loss(s, s)) == 0.0
    assert float(rrm_loss(s, -s)) == pytest.approx(2.0)
    assert float(rrm_loss(s, 5 * s)) == pytest.approx(0.0, abs=1e-7)  # scale-free
    orth = torch.tensor([[0.0, 1.0, 0.0], [0.0, 4.0, -3.0]])
    assert float(rrm_loss(s, orth)) == pytest.approx(1.0)
    # against the definition, 1 - s·t / (‖s‖‖t‖), on random features
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    ref = (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()
    torch.testing.assert_close(rrm_loss(a, b), ref)
    with pytest.raises(EnsdivError, match="two \\[B, F\\] tensors of one shape"):
        rrm_loss(torch.ones(2, 3), torch.ones(2, 4))


def test_crt_loss_on_hand_made_logits():
    s = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    t = torch.tensor([[4.0, 6.0], [0.0, 1.0]])
    assert float(crt_loss(s, s)) == 0.0
    assert float(crt_loss(s, t)) == pytest.approx((5.0 + 1.0) / 2)
    with pytest.raises(EnsdivError, match="two \\[B, K\\] tensors"):
        crt_loss(torch.ones(2, 3), torch.ones(3))


def test_teacher_is_frozen_and_builds_no_graph():
    t_ens = Ensemble.build("cnn", 1, in_shape=(1, 8, 8), num_classes=10, seed=1)
    teacher = Teacher(t_ens)
    before = [p.detach().clone() for p in t_ens.parameters()]
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    assert not teacher.features(x).requires_grad and not teacher.logits(x).requires_grad
    students = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
    for transfer in ("rrm", "crt"):
        loss_fn = TransferLoss(teacher, students, transfer, diversity="gal", lam=0.5)
        opt = torch.optim.SGD([*students.parameters(), *loss_fn.parameters()], lr=0.5)
        loss, _ = loss_fn(students, torch.rand(8, 1, 8, 8), torch.arange(8))
        loss.backward()
        opt.step()
    assert all(p.grad is None and not p.requires_grad for p in t_ens.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, t_ens.parameters(), strict=True))
    # the teacher's parameters are not the loss's: an optimizer over it never sees them
    assert not any(p is q for p in loss_fn.parameters() for q in t_ens.parameters())


def test_transfer_loss_matches_its_definition():
    torch.manual_seed(0)
    teacher = Teacher(Ensemble.build("cnn", 1, in_shape=(1, 8, 8), num_classes=10, seed=3))
    students = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
    x, y = torch.rand(5, 1, 8, 8), torch.arange(5)
    rrm = TransferLoss(teacher, students, "rrm", weight=0.3)
    assert all(isinstance(p, nn.Linear) and p.weight.shape == (128, 256) for p in rrm.project)
    loss, stats = rrm(students, x, y)
    ref = sum(0.3 * nn.functional.cross_entropy(m(x), y) +
              rrm_loss(p(m.features(x)), teacher.features(x))
              for m, p in zip(students.members, rrm.project, strict=True))
    torch.testing.assert_close(loss, ref)
    assert set(stats) == {"transfer_0", "transfer_1", "ce_0", "ce_1"}
    crt = TransferLoss(teacher, students, "crt")  # default weight 0: pure logit matching
    loss, _ = crt(students, x, y)
    torch.testing.assert_close(loss, sum(crt_loss(m(x), teacher.logits(x))
                                         for m in students.members))
    # with a diversity term: transfer + weight·CE + λ·R, the CE and R from ensemble_loss
    gal = TransferLoss(teacher, students, "crt", weight=0.2, diversity="gal", lam=0.5)
    loss, stats = gal(students, x, y)
    div, _ = ensemble_loss(students, x, y, diversity="gal", lam=0.5, ce_weight=0.2)
    torch.testing.assert_close(loss, sum(crt_loss(m(x), teacher.logits(x))
                                         for m in students.members) + div)
    assert "reg" in stats
    # same width: no projection
    same = TransferLoss(Teacher(Ensemble.build("mlp", 1, in_shape=(1, 8, 8), num_classes=10)),
                        students, "rrm")
    assert all(isinstance(p, nn.Identity) for p in same.project)
    assert not list(same.parameters())


def test_teacher_mismatches_are_clear_errors():
    with pytest.raises(EnsdivError, match="a teacher is one model"):
        Teacher(Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10))
    with pytest.raises(EnsdivError, match="must be an ensdiv member"):
        Teacher(nn.Linear(3, 2))
    teacher = Teacher(Ensemble.build("mlp", 1, in_shape=(1, 8, 8), num_classes=10))
    with pytest.raises(EnsdivError, match="teacher takes inputs of shape \\[1, 8, 8\\] but the "
                                          "student ensemble has inputs of shape \\[1, 28, 28\\]"):
        TransferLoss(teacher, Ensemble.build("mlp", 2, in_shape=(1, 28, 28), num_classes=10),
                     "rrm")
    with pytest.raises(EnsdivError, match="teacher has 10 classes but the student ensemble has 3"):
        TransferLoss(teacher, Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=3),
                     "crt")
    two = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match="unknown diversity 'galx'"):
        TransferLoss(teacher, two, "rrm", diversity="galx")
    with pytest.raises(EnsdivError, match="lam must be"):
        TransferLoss(teacher, two, "rrm", diversity="gal", lam=-1.0)
    with pytest.raises(EnsdivError, match="needs at least 2 members"):
        TransferLoss(teacher, Ensemble.build("mlp", 1, in_shape=(1, 8, 8), num_classes=10),
                     "rrm", diversity="gal")
    with pytest.raises(EnsdivError, match="unknown transfer .kd.; choose one of: crt, rrm"):
        TransferLoss(teacher, Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10),
                     "kd")


# --- small real runs on digits: transfer moves robustness to the students -------------------

@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory, one_thread):
    from ensdiv.runs.train import train_run
    from ensdiv.training import TrainConfig

    root = tmp_path_factory.mktemp("transfer")

    def run(name, **kw):  # students and plain members share seed 5; teachers use seed 7
        kw = {"dataset": "digits", "arch": "cnn", "seed": 5, **kw}
        return train_run(TrainConfig(**kw), out_dir=root / name, progress=False)[0]

    runs = {"at_teacher": run("at_teacher", members=1, epochs=10, seed=7,
                              objective="adversarial", eps=EPS, steps=5),
            "noise_teacher": run("noise_teacher", members=1, epochs=20, seed=7,
                                 noise_sigma=SIGMA)}
    # the same epochs for students and plain members: RRM needs ~30 on digits to match well
    runs["plain"] = run("plain", members=2, epochs=30)
    runs["rrm"] = run("rrm", members=2, epochs=30, teacher=str(root / "at_teacher"),
                      transfer="rrm")
    runs["noise_plain"] = run("noise_plain", members=2, epochs=10, noise_sigma=SIGMA)
    runs["crt"] = run("crt", members=2, epochs=10, teacher=str(root / "noise_teacher"),
                      transfer="crt", noise_sigma=SIGMA)
    return runs


EPS, SIGMA = 0.1, 0.5


def _pgd_accuracy(model, n=300):
    from ensdiv.attacks import pgd
    from ensdiv.data import load_dataset

    _, test, _ = load_dataset("digits")
    x = torch.stack([test[i][0] for i in range(n)])
    y = torch.tensor([test[i][1] for i in range(n)])
    x_adv = pgd(model, x, y, eps=EPS, steps=10, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model(x_adv).argmax(-1) == y).float().mean())


def test_rrm_students_of_an_adversarially_trained_teacher_resist_pgd(digits_runs):
    plain = [_pgd_accuracy(m) for m in digits_runs["plain"].members]
    students = [_pgd_accuracy(m) for m in digits_runs["rrm"].members]
    teacher = _pgd_accuracy(digits_runs["at_teacher"])
    assert teacher > max(plain) + 0.15, (teacher, plain)
    # (on 300 images a member's accuracy has a standard error of about 0.028)
    assert sum(students) / 2 > sum(plain) / 2 + 0.05, (students, plain, teacher)
    assert min(students) > min(plain), (students, plain, teacher)


def test_crt_students_match_their_teacher_and_certify_like_it(digits_runs):
    """CRT (Zhang et al.) makes the student's logits the teacher's on noisy inputs, so the
    students certify about as much as the teacher. (Against members trained with the same noise
    alone the difference on digits is within noise: +0.03 of 150 points in one run.)"""
    from ensdiv.data import load_dataset
    from ensdiv.smoothing import Smooth, certified_accuracy

    _, test, _ = load_dataset("digits")
    x = torch.stack([test[i][0] for i in range(200)])
    x = x + SIGMA * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    teacher_model = digits_runs["noise_teacher"].members[0]
    with torch.no_grad():
        t = teacher_model(x)
        dist = {name: [float((m(x) - t).norm(dim=1).mean())
                       for m in digits_runs[name].members] for name in ("crt", "noise_plain")}
    assert max(dist["crt"]) < 0.5 * min(dist["noise_plain"]), dist

    def certified(member, radius=0.25, n_points=150):
        recs = []
        for i in range(n_points):
            x, y = test[i]
            sm = Smooth(member, num_classes=10, sigma=SIGMA, seed=i, channels_last=False)
            pred, rad = sm.certify(x, n0=50, n=500, alpha=0.001, batch_size=250)
            recs.append({"correct": pred == y, "radius": rad})
        return certified_accuracy(recs, [radius])[0]

    teacher = certified(teacher_model)
    students = [certified(m) for m in digits_runs["crt"].members]
    print("distances", dist, "teacher", teacher, "students", students)
    # the students trained half the teacher's epochs: 0.53 vs 0.42 / 0.49 in one run
    assert min(students) >= teacher - 0.2 and max(students) > 0.3, (students, teacher)
