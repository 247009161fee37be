"""ensdiv.layers against torch.nn: same values, same first and second derivatives."""

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import grad, vmap

from ensdiv import layers
from ensdiv.layers import Conv2d, GroupNorm, MaxPool2d, ReLU


def pairs():
    """(ours, reference) layer pairs with the same parameters, float64."""
    torch.manual_seed(0)
    gn, ref_gn = GroupNorm(2, 6), nn.GroupNorm(2, 6)
    conv, ref_conv = Conv2d(6, 4, 3, stride=2, padding=1), nn.Conv2d(6, 4, 3, stride=2, padding=1)
    grouped = Conv2d(6, 4, 3, padding=1, dilation=2, groups=2, bias=False)
    ref_grouped = nn.Conv2d(6, 4, 3, padding=1, dilation=2, groups=2, bias=False)
    out = []
    for ours, ref in [(gn, ref_gn), (conv, ref_conv), (grouped, ref_grouped),
                      (ReLU(), nn.ReLU()), (MaxPool2d(2), nn.MaxPool2d(2)),
                      (MaxPool2d(3, 2, padding=1, ceil_mode=True),
                       nn.MaxPool2d(3, 2, padding=1, ceil_mode=True))]:
        for p in ours.parameters():
            nn.init.normal_(p)
        ref.load_state_dict(ours.state_dict())
        out.append((ours.double(), ref.double()))
    return out


PAIRS = pairs()


@pytest.fixture(autouse=True)
def everywhere(monkeypatch):
    """Plain autograd (gradcheck) takes the custom path too; torch.func would anyway."""
    monkeypatch.setitem(layers._EVERYWHERE, "on", True)
IDS = ["groupnorm", "conv", "conv-grouped", "relu", "maxpool", "maxpool-ceil"]


@pytest.mark.parametrize("ours,ref", PAIRS, ids=IDS)
def test_forward_and_state_dict_match_torch_nn(ours, ref):
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64)
    assert torch.equal(ours(x), ref(x)) or torch.allclose(ours(x), ref(x), atol=1e-12)
    assert ours.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("ours,ref", PAIRS, ids=IDS)
def test_double_backward_matches_autograd(ours, ref, compiled, monkeypatch):
    """Second derivatives wrt input and parameters equal torch.nn's (float64)."""
    if compiled:
        if not isinstance(ours, GroupNorm):
            pytest.skip("only GroupNorm has a compiled kernel")
        # the compiled kernel's numbers, without paying for compilation in the test suite:
        # the function torch.compile would fuse, run eagerly
        monkeypatch.setitem(layers._COMPILED, "enabled", True)
        monkeypatch.setitem(layers._COMPILED, "fn", layers._gn_double_backward)
    torch.manual_seed(1)
    x = torch.randn(3, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    results = []
    for mod in (ours, ref):
        out = mod(x)
        v = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
        (gx,) = torch.autograd.grad((out * v).sum() + (out ** 2).sum(), x, create_graph=True)
        params = [x, *mod.parameters()]
        results.append(torch.autograd.grad(gx.sin().sum(), params, allow_unused=True))
    for a, b in zip(*results, strict=True):
        if b is None:
            assert a is None or not a.abs().max() > 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("ours,ref", PAIRS, ids=IDS)
def test_gradcheck_and_gradgradcheck(ours, ref):
    torch.manual_seed(2)
    # distinct values: max pooling and ReLU are not differentiable at ties and at 0
    x = (torch.randperm(3 * 6 * 6 * 6, dtype=torch.float64) / 100 - 3.005).view(3, 6, 6, 6)
    x.requires_grad_(True)
    params = tuple(ours.parameters())

    def f(xx, *ps):
        return torch.func.functional_call(ours, dict(zip(dict(ours.named_parameters()), ps,
                                                         strict=True)), (xx,))

    assert gradcheck(f, (x, *params))
    assert gradgradcheck(f, (x, *params))


def test_input_gradient_via_torch_func_and_vmap():
    """The torch.func path ensdiv trains with: grad over x, vmap over stacked members."""
    torch.manual_seed(3)
    members = [nn.Sequential(Conv2d(1, 4, 3, padding=1), GroupNorm(2, 4), ReLU(),
                             MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 9, 3)).double()
               for _ in range(2)]
    refs = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 9, 3)).double()
            for _ in range(2)]
    for m, r in zip(members, refs, strict=True):
        r.load_state_dict(m.state_dict())
    x = torch.rand(5, 1, 6, 6, dtype=torch.float64)

    def loss_of(model):
        return lambda xx: model(xx).logsumexp(-1).sum()

    def reg(models, stacked):
        if stacked:
            params, bufs = torch.func.stack_module_state(models)
            base = models[0]

            def one(p, b):
                return grad(lambda xx: torch.func.functional_call(base, (p, b), (xx,))
                            .logsumexp(-1).sum())(x)
            g = vmap(one)(params, bufs)
            return (g[0] * g[1]).sum(), params
        g = [grad(loss_of(m))(x) for m in models]
        return (g[0] * g[1]).sum(), [p for m in models for p in m.parameters()]

    r_ref, p_ref = reg(refs, False)
    want = torch.autograd.grad(r_ref, p_ref)
    r_loop, p_loop = reg(members, False)
    torch.testing.assert_close(torch.autograd.grad(r_loop, p_loop), want)
    r_stk, p_stk = reg(members, True)
    got = torch.autograd.grad(r_stk, list(p_stk.values()))
    # stacked parameters are [2, ...]: compare member by member
    names = list(p_stk)
    flat_want = {n: torch.stack([want[i * len(names) + j] for i in range(2)])
                 for j, n in enumerate(names)}
    for n, gg in zip(names, got, strict=True):
        torch.testing.assert_close(gg, flat_want[n])


@pytest.mark.parametrize("everywhere_on", [True, False], ids=["custom", "default"])
def test_first_order_backward_is_torch_nn(everywhere_on, monkeypatch):
    """Plain training (no create_graph) gets bit-identical gradients to torch.nn: by default
    outside torch.func the layers are torch.nn's; the custom path calls the same kernels."""
    monkeypatch.setitem(layers._EVERYWHERE, "on", everywhere_on)
    for ours, ref in PAIRS:
        x = torch.randn(2, 6, 8, 8, dtype=torch.float64, requires_grad=True)
        a = torch.autograd.grad(ours(x).square().sum(), [x, *ours.parameters()])
        b = torch.autograd.grad(ref(x).square().sum(), [x, *ref.parameters()])
        for u, w in zip(a, b, strict=True):
            torch.testing.assert_close(u, w, rtol=0, atol=1e-12)


def test_autocast_and_empty_batch_fall_back_to_torch_nn():
    gn = GroupNorm(2, 4)
    assert gn(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = Conv2d(4, 2, 3)(gn(torch.randn(2, 4, 5, 5)))
    assert out.dtype == torch.bfloat16


def test_custom_autograd_only_inside_torch_func(monkeypatch):
    monkeypatch.setitem(layers._EVERYWHERE, "on", False)
    calls = []
    apply = layers._GroupNormFn.apply
    monkeypatch.setattr(layers._GroupNormFn, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    gn = GroupNorm(2, 4)
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = gn(x)
    assert type(out.grad_fn).__name__ == "NativeGroupNormBackward0" and not calls
    gx = grad(lambda xx: gn(xx).square().sum())(x)
    assert calls  # (functorch may re-enter apply once per transform level)
    torch.autograd.grad(gx.sum(), gn.weight)


def test_small_activations_keep_torch_nn_layers_inside_torch_func(monkeypatch):
    monkeypatch.setitem(layers._EVERYWHERE, "on", False)
    calls = []
    apply = layers._ReLUFn.apply
    monkeypatch.setattr(layers._ReLUFn, "apply", lambda *a: calls.append(1) or apply(*a))
    relu = ReLU()
    grad(lambda xx: relu(xx).sum())(torch.randn(4, 8))
    assert not calls
    monkeypatch.setattr(layers, "MIN_ELEMENTS", 32)
    grad(lambda xx: relu(xx).sum())(torch.randn(4, 8))
    assert calls


def test_compiled_switch():
    layers.use_compiled_kernels(True)
    try:
        assert layers.compiled_kernels_enabled() and layers.compile_mode() == "on"
        layers.use_compiled_kernels("auto")  # each training run decides: off until one does
        assert not layers.compiled_kernels_enabled() and layers.compile_mode() == "auto"
        layers.use_compiled_kernels("on")
        assert layers.compiled_kernels_enabled()
        with pytest.raises(ValueError, match="not 'yes'"):
            layers.use_compiled_kernels("yes")
    finally:
        layers.use_compiled_kernels(False)
    assert not layers.compiled_kernels_enabled() and layers.compile_mode() == "off"


def test_compile_seconds_counts_the_first_call_of_each_shape(monkeypatch):
    """The compile time is the time of the fused kernel's first call per activation shape
    (the kernel itself replaced by a slow eager one: no compiling in the test suite)."""
    import time

    def slow_first(*args):
        time.sleep(0.05)
        return layers._gn_double_backward(*args)

    monkeypatch.setitem(layers._COMPILED, "fn", slow_first)
    monkeypatch.setitem(layers._COMPILED, "seconds", 0.0)
    monkeypatch.setitem(layers._COMPILED, "shapes", set())
    monkeypatch.setitem(layers._COMPILED, "enabled", True)
    gn = GroupNorm(2, 4).double()
    for shape in [(2, 4, 5, 5), (2, 4, 5, 5), (3, 4, 5, 5)]:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(gn(x).square().sum(), x, create_graph=True)
        g.sin().sum().backward()
    assert len(layers._COMPILED["shapes"]) == 2  # the repeated shape is not timed again
    assert 0.1 <= layers.compile_seconds() < 0.1 + 1.0
