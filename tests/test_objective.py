import pytest
import torch
from torch import nn

from ensdiv.diversity import cosine_loss, gal_loss, gdr_loss
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.objective import ce_loss, drt_loss, ensemble_loss


def reference_objective(ens, x, y, reg_fn, lam):
    """Loop reference: autograd.grad(create_graph=True) per member, then CE + λ·reg."""
    grads, ces = [], []
    for member in ens.members:
        xx = x.clone().requires_grad_(True)
        logits = member(xx)
        ces.append(nn.functional.cross_entropy(logits, y))
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y, reduction="sum"), xx,
                                   create_graph=True)
        grads.append(g)
    return sum(ces) + lam * reg_fn(torch.stack(grads)), ces


def test_ce_loss_is_sum_of_member_ces():
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss, stats = ce_loss(ens, x, y)
    ref = [nn.functional.cross_entropy(m(x), y).detach() for m in ens.members]
    torch.testing.assert_close(loss.detach(), sum(ref))
    assert stats == pytest.approx({f"ce_{i}": float(r) for i, r in enumerate(ref)})
    none_loss, _ = ensemble_loss(ens, x, y, diversity="none")
    torch.testing.assert_close(none_loss, loss)


@pytest.mark.parametrize("name,fn", [("cos", cosine_loss), ("gal", gal_loss), ("gdr", gdr_loss)])
@pytest.mark.parametrize("path", ["stacked", "loop"])
@pytest.mark.parametrize("m", [2, 3, 4])
def test_objective_and_its_parameter_gradients_match_reference(name, fn, path, m):
    torch.manual_seed(m)
    ens = Ensemble.build("cnn", m, in_shape=(1, 8, 8), num_classes=5, seed=m, path=path)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 5, (8,))
    loss, stats = ensemble_loss(ens, x, y, diversity=name, lam=0.7)
    ens.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in ens.parameters()]
    ref_loss, ref_ces = reference_objective(ens, x, y, fn, 0.7)
    ens.zero_grad()
    ref_loss.backward()
    ref = [p.grad.clone() for p in ens.parameters()]
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=1e-5, rtol=1e-5)
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6
    assert stats["ce_0"] == pytest.approx(float(ref_ces[0].detach()), abs=1e-5)
    assert set(stats) == {*(f"ce_{i}" for i in range(m)), "reg", "train_cos"}


def test_regularizer_changes_the_update():
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=3, seed=0)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 3, (8,))
    (a,) = torch.autograd.grad(ensemble_loss(ens, x, y, diversity="gal", lam=0.0)[0],
                               ens.members[0].head.weight)
    (b,) = torch.autograd.grad(ensemble_loss(ens, x, y, diversity="gal", lam=5.0)[0],
                               ens.members[0].head.weight)
    assert not torch.allclose(a, b)


def test_bad_input():
    one = Ensemble.build("mlp", 1, in_shape=(1, 8, 8), num_classes=3)
    x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 1])
    with pytest.raises(EnsdivError, match="at least 2 members"):
        ensemble_loss(one, x, y, diversity="gal")
    two = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=3)
    with pytest.raises(EnsdivError, match="cos, drt, dverge, gal, gdr, none, trs"):
        ensemble_loss(two, x, y, diversity="tr")
    for whole in ("trs", "dverge"):
        with pytest.raises(EnsdivError, match=f"use ensdiv.{whole}.{whole}_loss"):
            ensemble_loss(two, x, y, diversity=whole)
    with pytest.raises(EnsdivError, match="lam"):
        ensemble_loss(two, x, y, lam=-1.0)


def _drt_reference(ens, x, y, lam):
    """DRT by an explicit torch.autograd.grad(create_graph=True) loop, term by term."""
    x = x.detach().requires_grad_(True)
    grads, logits, margins = [], [], []
    for member in ens.members:
        z = member(x)
        p = torch.softmax(z, -1).sort(-1, descending=True).values
        mg = p[:, 0] - p[:, 1]
        (g,) = torch.autograd.grad(mg.sum(), x, create_graph=True)
        grads.append(g.flatten(1))
        logits.append(z)
        margins.append(mg)
    ce = sum(torch.nn.functional.cross_entropy(z, y) for z in logits)
    ok = [z.argmax(-1) == y for z in logits]
    gd_terms, n_pairs = [], 0
    for i in range(len(grads)):
        for j in range(i + 1, len(grads)):
            for b in range(len(y)):
                if ok[i][b] and ok[j][b]:
                    gd_terms.append(((grads[i][b] + grads[j][b]) ** 2).sum())
                    n_pairs += 1
    gd = sum(gd_terms) / max(n_pairs, 1) if gd_terms else torch.zeros(())
    cm_terms = [margins[k][b] for k in range(len(grads)) for b in range(len(y)) if ok[k][b]]
    cm = sum(cm_terms) / max(len(cm_terms), 1) if cm_terms else torch.zeros(())
    return ce + lam * (gd - cm)


def test_drt_matches_an_autograd_loop_reference_with_parameter_gradients():
    torch.manual_seed(0)
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=4, seed=0)
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,))
    with torch.no_grad():  # make sure some samples are right for some members and not others
        y[:8] = ens.member_logits(x[:8])[0].argmax(-1)
    loss, stats = drt_loss(ens, x, y, lam=0.7)
    ref = _drt_reference(ens, x, y, 0.7)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    got = torch.autograd.grad(loss, list(ens.parameters()))
    want = torch.autograd.grad(ref, list(ens.parameters()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert stats["drt_gd"] >= 0 and 0 <= stats["drt_cm"] <= 1
    assert float(stats["reg"]) == pytest.approx(float(stats["drt_gd"] - stats["drt_cm"]),
                                                abs=1e-6)
    same, _ = ensemble_loss(ens, x, y, diversity="drt", lam=0.7)
    torch.testing.assert_close(same, loss)


def test_adversarial_loss_is_each_members_ce_on_its_own_pgd_examples():
    from ensdiv.attacks import pgd
    from ensdiv.objective import adversarial_loss

    ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=5, seed=0)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 5, (6,))
    torch.manual_seed(7)
    loss, stats = adversarial_loss(ens, x, y, eps=0.1, steps=3)
    ens.zero_grad()
    loss.backward()
    got = [p.grad.clone() for p in ens.parameters()]
    torch.manual_seed(7)  # the same random starts, drawn in the same order
    advs = [pgd(m, x, y, eps=0.1, steps=3, keep="last") for m in ens.members]
    ces = [nn.functional.cross_entropy(m(a), y) for m, a in zip(ens.members, advs, strict=True)]
    ens.zero_grad()
    sum(ces).backward()  # the examples are constants: no gradient flows through the attack
    for a, b in zip(got, [p.grad for p in ens.parameters()], strict=True):
        torch.testing.assert_close(a, b)
    assert stats["ce_1"] == pytest.approx(float(ces[1].detach()), abs=1e-6)
    for a in advs:
        assert float((a - x).abs().max()) <= 0.1 + 1e-6
    # the examples are adversarial: CE higher than on the clean batch
    assert sum(float(c.detach()) for c in ces) > float(ce_loss(ens, x, y)[0].detach())
    assert {"adv_acc_0", "adv_acc_1"} <= set(stats)
    # with a diversity term: + λ·R on the clean batch
    torch.manual_seed(7)
    with_gal, stats = adversarial_loss(ens, x, y, eps=0.1, steps=3, diversity="gal", lam=0.5)
    reg = ensemble_loss(ens, x, y, diversity="gal", lam=0.5, ce_weight=0.0)[0]
    torch.testing.assert_close(with_gal, loss + reg)
    assert "reg" in stats
