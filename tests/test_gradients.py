import pytest
import torch
from torch import nn

from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.gradients import input_gradients, runner_up
from ensdiv.models import build_model


def loop_reference(ensemble, x, y, *, mode="loss", create_graph=False):
    """The independent reference: a Python loop of torch.autograd.grad per member."""
    target = None
    if mode == "margin":
        with torch.no_grad():
            probs = torch.softmax(torch.stack([m(x) for m in ensemble.members]), -1).mean(0)
            probs[torch.arange(len(y)), y] = -1
            target = probs.argmax(1)
    out = []
    for member in ensemble.members:
        xx = x.detach().clone().requires_grad_(True)
        logits = member(xx)
        if mode == "loss":
            obj = nn.functional.cross_entropy(logits, y, reduction="sum")
        else:
            idx = torch.arange(len(y))
            obj = (logits[idx, target] - logits[idx, y]).sum()
        (g,) = torch.autograd.grad(obj, xx, create_graph=create_graph)
        out.append(g)
    return torch.stack(out)


CASES = [("mlp", (1, 8, 8)), ("cnn", (1, 12, 12)), ("cnn-nf", (1, 12, 12)),
         ("resnet20", (3, 8, 8)), ("resnet20-fixup", (3, 8, 8))]


def _away_from_init(ens):
    """Fixup starts every residual branch at zero and every scalar bias at 0: move all
    parameters so that no branch of the double backward is trivially zero."""
    with torch.no_grad():
        for p in ens.parameters():
            p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("arch,shape", CASES)
@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("path", ["stacked", "loop"])
@pytest.mark.parametrize("mode", ["loss", "margin"])
def test_matches_loop_reference(arch, shape, m, path, mode):
    # float64: in float32 a ReLU input within rounding of zero (seen at 1.5e-6 on a 20-layer
    # net without normalization) takes the other branch when the two paths round differently
    torch.manual_seed(m)
    ens = Ensemble.build(arch, m, in_shape=shape, num_classes=6, seed=m, path=path).double()
    _away_from_init(ens)
    x, y = torch.rand(7, *shape, dtype=torch.float64), torch.randint(0, 6, (7,))
    got = input_gradients(ens, x, y, mode=mode)
    ref = loop_reference(ens, x, y, mode=mode)
    assert got.shape == (m, 7, *shape)
    assert not got.requires_grad
    assert (got - ref).abs().max() <= 1e-10 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("arch,shape", CASES)
@pytest.mark.parametrize("path", ["stacked", "loop"])
def test_double_backprop_matches_reference(arch, shape, path):
    torch.manual_seed(0)
    ens = Ensemble.build(arch, 3, in_shape=shape, num_classes=5, seed=1, path=path)
    _away_from_init(ens)
    ens = ens.to(torch.float64)  # float32 roundoff would blur a wrong term in a small tensor
    x, y = torch.rand(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
    w = torch.randn(3, 6, *shape, dtype=torch.float64)  # a fixed random functional of them

    def param_grads(grads):
        ens.zero_grad(set_to_none=True)
        ((grads * w).sum() + grads.square().sum()).backward()
        return [p.grad.clone() for p in ens.parameters()]

    got = param_grads(input_gradients(ens, x, y, create_graph=True))
    ref = param_grads(loop_reference(ens, x, y, create_graph=True))
    for a, b in zip(got, ref, strict=True):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max() + 1e-12
    assert any(a.abs().sum() > 0 for a in got)


@pytest.mark.parametrize("path", ["stacked", "loop"])
def test_gradcheck_float64(path):
    """Second order: d(input gradients)/d(parameters) against finite differences."""
    torch.manual_seed(0)
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=3, seed=0,
                         path=path).double()
    for mod in ens.members:  # smooth members, so no ReLU kink trips the finite differences
        mod.body[2], mod.body[4] = nn.Tanh(), nn.Tanh()
    ens.refresh_skeleton()
    x, y = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.tensor([0, 2])

    class Grads(nn.Module):
        def __init__(self, ensemble):
            super().__init__()
            self.ensemble = ensemble

        def forward(self, xx):
            return input_gradients(self.ensemble, xx, y, create_graph=True)

    wrapper = Grads(ens)
    names = ["ensemble.members.1.body.3.bias", "ensemble.members.0.head.weight"]
    params = dict(wrapper.named_parameters())

    def fn(b, w):
        return torch.func.functional_call(wrapper, {names[0]: b, names[1]: w}, (x,))

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(fn, inputs)


def test_heterogeneous_members():
    members = [build_model("mlp", in_shape=(1, 8, 8), num_classes=4),
               build_model("cnn", in_shape=(1, 8, 8), num_classes=4)]
    ens = Ensemble(members)
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 3])
    torch.testing.assert_close(input_gradients(ens, x, y), loop_reference(ens, x, y))


def test_runner_up_is_best_wrong_class():
    ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=5, seed=0)
    x, y = torch.rand(20, 1, 8, 8), torch.randint(0, 5, (20,))
    t = runner_up(ens, x, y)
    assert (t != y).all()
    p = ens(x).exp()
    assert torch.all(p.gather(1, t[:, None]).squeeze(1)
                     >= p.scatter(1, y[:, None], -1).max(1).values)


def test_mode_restored_and_param_grads_untouched():
    ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=3).eval()
    input_gradients(ens, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    assert not ens.training
    assert all(p.grad is None for p in ens.parameters())


def test_bad_input():
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=3)
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(EnsdivError, match=r"\[0, 1\]"):
        input_gradients(ens, x * 3, torch.tensor([0, 1]))
    with pytest.raises(EnsdivError, match="shape"):
        input_gradients(ens, x, torch.tensor([0, 1, 2]))
    with pytest.raises(EnsdivError, match="integer"):
        input_gradients(ens, x, torch.tensor([0.0, 1.0]))
    with pytest.raises(EnsdivError, match=r"labels must lie in \[0, 3\)"):
        input_gradients(ens, x, torch.tensor([0, 3]))
    with pytest.raises(EnsdivError, match="loss, margin"):
        input_gradients(ens, x, torch.tensor([0, 1]), mode="logit")
