"""Drop-in layers whose *double* backward is cheap, for gradient-diversity training.

GAL, cos, GDR and DRT differentiate each member's input gradient once more (double backprop).
PyTorch's layers do their first backward in one native kernel each, but differentiate that
backward with generic formulas that cost far more than needed on the members' big activations:

* ``GroupNorm``: the derivative of its backward is a composite of a few dozen elementwise
  kernels. :class:`GroupNorm` uses the closed form below — one native kernel and a handful of
  per-channel dot products, or one fused kernel with :func:`use_compiled_kernels`.
* ``ReLU`` and ``MaxPool2d``: the derivative of their backward with respect to the layer's
  *input* is identically zero, yet autograd materializes it as a zero tensor of the
  activation's size and adds it in. :class:`ReLU` and :class:`MaxPool2d` give their backward a
  detached input, so that branch does not exist.
* ``Conv2d``: the weight derivative of the input gradient is computed as a convolution with
  batch and channels swapped (slow on CPU). :class:`Conv2d` computes it with the ordinary
  weight-gradient kernel: ⟨v, conv_transposeᵂ(g)⟩ = ⟨conv_W(v), g⟩, so it *is* the weight
  gradient of a convolution of v with output gradient g.

Each class subclasses its ``torch.nn`` counterpart: same constructor, parameters, state-dict
keys and numbers (checkpoints load either way). The custom autograd runs inside ``torch.func``
transforms — where ensdiv computes the input gradients it regularizes
(:mod:`ensdiv.gradients`, DRT) — and its first-order backward calls the same native kernels as
``torch.nn``; everywhere else (plain training, attacks, certification) the layers *are*
``torch.nn``'s; ReLU, max pooling and convolutions also below :data:`MIN_ELEMENTS` elements,
where an autograd Function's overhead outweighs the zero tensors it saves. Tested against
autograd's own double backward (``tests/test_layers.py``).

GroupNorm's closed form. Per sample and group of k elements, x̂ = (x − μ)·r, r = 1/√(var + ε),
γ per channel, upstream gradient g, ĝ = g·γ, and P(z) = r·(z − mean(z) − x̂·mean(z·x̂)) (the
projection GroupNorm's backward applies), the input gradient is dx = P(ĝ). For an upstream v of
dx, with c = mean(ĝ·x̂), p = mean(v·x̂) and q = mean(v·dx)/r (per group):

    ∂⟨v, dx⟩/∂g = γ·P(v),    ∂/∂γ = Σ_{samples, pixels} g·P(v),
    ∂⟨v, dx⟩/∂x = −r·c·P(v) − r·p·dx − r²·q·x̂.

Example:
    >>> import torch
    >>> gn = GroupNorm(2, 4)
    >>> x = torch.randn(3, 4, 5, 5, requires_grad=True)
    >>> (gx,) = torch.autograd.grad(gn(x).pow(2).sum(), x, create_graph=True)
    >>> gx.pow(2).sum().backward()  # double backprop into gn.weight
    >>> gn.weight.grad.shape
    torch.Size([4])
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import COMPILE_MODES as COMPILE_MODES
from ensdiv.vocab import CompileMode as CompileMode

_COMPILED: dict[str, Any] = {"enabled": False, "fn": None, "auto": False, "seconds": 0.0,
                             "shapes": set()}


def use_compiled_kernels(enabled: bool | CompileMode = True) -> None:
    """Fuse GroupNorm's double backward into one kernel with ``torch.compile`` (or stop).

    The first call per activation shape compiles (about 12 s on this project's CPU, cached on
    disk by inductor; :func:`compile_seconds` counts it), so this pays off for training runs,
    not short tests; numbers agree with the eager path to float rounding. ``"auto"`` leaves the
    choice to each :func:`ensdiv.training.train` run (:func:`ensdiv.training.compile_pays`);
    ``True`` or ``"on"`` compiles, ``False`` or ``"off"`` does not. Falls back to eager (with one
    warning) where compilation fails.

    Example:
        >>> use_compiled_kernels(False)
    """
    if enabled not in (True, False) + COMPILE_MODES:
        raise ValueError(f"use_compiled_kernels takes True, False or one of {COMPILE_MODES}, "
                         f"not {enabled!r}")
    _COMPILED["auto"] = enabled == "auto"
    _COMPILED["enabled"] = enabled in (True, "on")


def compiled_kernels_enabled() -> bool:
    """Whether the fused kernel is in use now (``"auto"``: what the current run decided)."""
    return bool(_COMPILED["enabled"])


def compile_mode() -> CompileMode:
    """The mode :func:`use_compiled_kernels` last set."""
    return "auto" if _COMPILED["auto"] else "on" if _COMPILED["enabled"] else "off"


def compile_seconds() -> float:
    """Seconds this process has spent in first calls of the fused kernel — compiling (or
    loading from the disk cache) one activation shape each."""
    return float(_COMPILED["seconds"])


#: Use the custom autograd everywhere, not only inside torch.func transforms (for tests).
_EVERYWHERE = {"on": False}


#: Below this many elements ReLU, MaxPool2d and Conv2d run the torch.nn layer even inside
#: torch.func: the zero tensors they avoid are small, and an autograd Function's Python overhead
#: under torch.func (~0.1–0.5 ms a call on CPU) costs more (measured at batch 32 vs 128).
MIN_ELEMENTS = 1 << 20


def _native(x: Tensor, large: bool = True) -> bool:
    """Whether to run the plain ``torch.nn`` layer: outside torch.func transforms (plain
    training, attacks, inference: bit-identical to torch.nn and without the Python overhead of
    an autograd Function, measured ~5% of a plain step), under autocast (mixed dtypes) and on
    empty batches. ensdiv takes every input gradient it differentiates again inside
    ``torch.func.grad``/``vmap``, where the custom autograd applies."""
    if torch.is_autocast_enabled(x.device.type) or x.numel() == 0:
        return True
    if _EVERYWHERE["on"]:
        return False
    return not (large and torch._C._are_functorch_transforms_active())


# --------------------------------------------------------------------------- GroupNorm

def _gn_backward(g: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None,
                 groups: int, mask: list[bool]) -> tuple[Tensor | None, ...]:
    """GroupNorm's native first backward (dx, dγ, dβ as ``mask`` asks) for x [N, C, *]."""
    n, c = x.shape[:2]
    return torch.ops.aten.native_group_norm_backward(g, x, mean, rstd, weight, n, c,
                                                     x[0, 0].numel(), groups, mask)


def _gn_double_backward(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                        dx: Tensor, v: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """(∂/∂g, ∂/∂x, ∂/∂γ) of ⟨v, dx⟩ as plain elementwise code (what torch.compile fuses)."""
    n = x.shape[0]
    cshape = (1, -1) + (1,) * (x.dim() - 2)
    r = rstd[..., None]
    xhat = (x.reshape(n, groups, -1) - mean[..., None]) * r
    gg = (g * weight.view(cshape)).reshape(n, groups, -1)
    vg = v.reshape(n, groups, -1)
    dxg = dx.reshape(n, groups, -1)
    pv = r * (vg - vg.mean(-1, keepdim=True) - xhat * (vg * xhat).mean(-1, keepdim=True))
    grad_g = pv.reshape(x.shape) * weight.view(cshape)
    grad_w = (g * pv.reshape(x.shape)).sum([0, *range(2, x.dim())])
    c = (gg * xhat).mean(-1, keepdim=True)
    p = (vg * xhat).mean(-1, keepdim=True)
    q = (vg * dxg).mean(-1, keepdim=True) / r
    grad_x = (-r * c * pv - r * p * dxg - r * r * q * xhat).reshape(x.shape)
    return grad_g, grad_x, grad_w


def _gn_double_backward_eager(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                              dx: Tensor, v: Tensor, groups: int,
                              need: tuple[bool, ...]) -> tuple[Tensor | None, ...]:
    """The same formula in few passes over memory: a native kernel and per-channel dots."""
    n, c = x.shape[:2]
    k = x.numel() // (n * groups)
    cshape = (1, -1) + (1,) * (x.dim() - 2)
    # P(v) is GroupNorm's own input backward with γ = 1: one native kernel
    pv = _gn_backward(v, x, mean, rstd, None, groups, [True, False, False])[0]
    grad_g = pv * weight.view(cshape) if need[0] else None
    grad_w = torch.linalg.vecdot(g.flatten(2), pv.flatten(2)).sum(0) if need[2] else None
    grad_x = None
    if need[1]:
        # per-group scalars from per-channel sums (vecdot: one pass each), then three
        # multiply-adds: each big tensor is read a few times, none is written twice
        xc, gc, vc = x.flatten(2), g.flatten(2), v.flatten(2)
        mu = mean.repeat_interleave(c // groups, 1)  # [N, C]

        def per_group(t: Tensor) -> Tensor:  # [N, C] → [N, G, 1]
            return t.view(n, groups, -1).sum(-1, keepdim=True)

        r = rstd[..., None]
        cc = r / k * per_group(weight * (torch.linalg.vecdot(gc, xc) - mu * gc.sum(-1)))
        p = r / k * per_group(torch.linalg.vecdot(vc, xc) - mu * vc.sum(-1))
        q = per_group(torch.linalg.vecdot(vc, dx.flatten(2))) / (k * r)
        r3q = r**3 * q
        out = pv.reshape(n, groups, -1) * (-r * cc)
        out.addcmul_(dx.reshape(n, groups, -1), -r * p)
        out.addcmul_(x.reshape(n, groups, -1), -r3q)
        out.add_(r3q * mean[..., None])
        grad_x = out.view(x.shape)
    return grad_g, grad_x, grad_w


def _gn_double_backward_compiled(*args: Any) -> tuple[Tensor, Tensor, Tensor] | None:
    """The fused kernel, or None (eager) where compilation fails."""
    if _COMPILED["fn"] is None:
        # static shapes: a symbolic-shape kernel measured several times slower on CPU
        _COMPILED["fn"] = torch.compile(_gn_double_backward, dynamic=False)
    key = tuple((tuple(a.shape), a.dtype, a.device.type) if isinstance(a, Tensor) else a
                for a in args)
    try:
        if key in _COMPILED["shapes"]:
            return _COMPILED["fn"](*args)
        start = time.perf_counter()
        out = _COMPILED["fn"](*args)
        _COMPILED["seconds"] += time.perf_counter() - start
        _COMPILED["shapes"].add(key)
        return out
    except Exception as err:  # noqa: BLE001 - no compiler, unsupported device: stay eager
        warnings.warn(f"ensdiv: compiled GroupNorm kernel unavailable ({type(err).__name__}); "
                      f"using the eager double backward", stacklevel=2)
        _COMPILED["enabled"] = False
        return None


def _batched(*tensors: Tensor) -> bool:
    """Inside vmap (the stacked path): in-place ops lack batching rules, compile does not apply."""
    return any(torch._C._functorch.is_batchedtensor(t) for t in tensors)


class _GroupNormInputGrad(torch.autograd.Function):
    """GroupNorm's dx as a function of (g, x, γ); its backward is the closed form above."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                groups: int) -> Tensor:
        return _gn_backward(g, x, mean, rstd, weight, groups, [True, False, False])[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        g, x, weight, mean, rstd, groups = inputs
        ctx.save_for_backward(g, x, weight, mean, rstd, output)
        ctx.groups = groups

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        g, x, weight, mean, rstd, dx = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        args = (g, x, weight, mean, rstd, dx, v, ctx.groups)
        out = None
        if _batched(g, x, v):
            out = _gn_double_backward(*args)
        elif _COMPILED["enabled"]:
            out = _gn_double_backward_compiled(*args)
        if out is None:
            out = _gn_double_backward_eager(*args, need)
        else:
            out = tuple(t if n else None for t, n in zip(out, need, strict=True))
        grad_g, grad_x, grad_w = out
        return grad_g, grad_x, grad_w, None, None, None


class _GroupNormFn(torch.autograd.Function):
    """GroupNorm's forward (one native kernel); backward through :class:`_GroupNormInputGrad`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor, groups: int,
                eps: float) -> tuple[Tensor, Tensor, Tensor]:
        n, c = x.shape[:2]
        return torch.ops.aten.native_group_norm(x, weight, bias, n, c, x[0, 0].numel(), groups,
                                                eps)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, bias, groups, eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups, ctx.eps = groups, eps

    @staticmethod
    def backward(ctx: Any, g: Tensor, _mean: Tensor, _rstd: Tensor) -> tuple[Tensor | None, ...]:
        if g is None:
            return None, None, None, None, None
        x, weight, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():  # first order only: the native fused kernel
            dx, dw, db = _gn_backward(g, x, mean, rstd, weight, ctx.groups,
                                      [need_x, need_w, need_b])
            return dx, dw, db, None, None
        dx = _GroupNormInputGrad.apply(g, x, weight, mean, rstd, ctx.groups) if need_x else None
        dw = db = None
        if need_w or need_b:
            # weight gradients with create_graph (input-gradient regularizers never ask):
            # x̂ from the native layer without affine, whose own derivatives are exact
            red = [0, *range(2, x.dim())]
            xhat = nn.functional.group_norm(x, ctx.groups, eps=ctx.eps)
            dw = (g * xhat).sum(red) if need_w else None
            db = g.sum(red) if need_b else None
        return dx, dw, db, None, None


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm`` (Wu & He, ECCV 2018) with a closed-form double backward.

    Inputs [N, C, *] with C divisible by ``num_groups``; ``affine=False`` layers and autocast
    use the plain layer.

    Example:
        >>> GroupNorm(8, 32)(torch.randn(2, 32, 4, 4)).shape
        torch.Size([2, 32, 4, 4])
    """

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` [N, C, *] per sample over groups of C / num_groups channels."""
        if not self.affine or x.dim() < 3 or _native(x):
            return super().forward(x)
        return _GroupNormFn.apply(x, self.weight, self.bias, self.num_groups, self.eps)[0]


# --------------------------------------------------------------------------- ReLU

class _ReLUFn(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.relu(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        # detached: d(backward)/d(input) is 0 a.e.; autograd would build that zero tensor
        return torch.ops.aten.threshold_backward(g, out.detach(), 0)


class ReLU(nn.ReLU):
    """``torch.nn.ReLU`` whose backward has no zero-valued branch into its input.

    Example:
        >>> ReLU()(torch.tensor([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """

    def forward(self, x: Tensor) -> Tensor:
        """max(x, 0) elementwise."""
        if self.inplace or _native(x, x.numel() >= MIN_ELEMENTS):
            return super().forward(x)
        return _ReLUFn.apply(x)


# --------------------------------------------------------------------------- MaxPool2d

class _MaxPoolFn(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, kernel: list[int], stride: list[int], padding: list[int],
                dilation: list[int], ceil: bool) -> tuple[Tensor, Tensor]:
        return torch.ops.aten.max_pool2d_with_indices(x, kernel, stride, padding, dilation, ceil)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, *ctx.args = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zero tensor for the indices' gradient
        ctx.save_for_backward(x, output[1])

    @staticmethod
    def backward(ctx: Any, g: Tensor, _indices: Tensor) -> tuple[Tensor | None, ...]:
        if g is None:
            return None, None, None, None, None, None
        x, indices = ctx.saved_tensors
        # detached input: the derivative of the backward with respect to x is 0
        dx = torch.ops.aten.max_pool2d_with_indices_backward(g, x.detach(), *ctx.args, indices)
        return dx, None, None, None, None, None


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d`` whose backward has no zero-valued branch into its input.

    Example:
        >>> MaxPool2d(2)(torch.arange(16.0).view(1, 1, 4, 4)).flatten().tolist()
        [5.0, 7.0, 13.0, 15.0]
    """

    def forward(self, x: Tensor) -> Tensor:
        """Max over each window of ``x`` [N, C, H, W]."""
        if self.return_indices or x.dim() != 4 or _native(x, x.numel() >= MIN_ELEMENTS):
            return super().forward(x)
        stride = self.stride if self.stride else self.kernel_size
        return _MaxPoolFn.apply(x, list(_pair(self.kernel_size)), list(_pair(stride)),
                                list(_pair(self.padding)), list(_pair(self.dilation)),
                                bool(self.ceil_mode))[0]


# --------------------------------------------------------------------------- Conv2d

def _conv_backward(g: Tensor, x: Tensor, weight: Tensor, args: tuple,
                   mask: list[bool]) -> tuple[Tensor | None, ...]:
    stride, padding, dilation, groups, bias_size = args
    return torch.ops.aten.convolution_backward(g, x, weight, bias_size, stride, padding,
                                               dilation, False, [0, 0], groups, mask)


class _ConvInputGrad(torch.autograd.Function):
    """conv's input gradient as a function of (g, W); its backward uses conv's own kernels."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g: Tensor, weight: Tensor, x: Tensor, args: tuple) -> Tensor:
        return _conv_backward(g, x, weight, args, [True, False, False])[0]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        g, weight, x, ctx.args = inputs
        ctx.save_for_backward(g, weight)

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple[Tensor | None, ...]:
        g, weight = ctx.saved_tensors
        stride, padding, dilation, groups, _ = ctx.args
        grad_g = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_g = nn.functional.conv2d(v, weight, None, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:  # ⟨v, convᵀ_W(g)⟩ = ⟨conv_W(v), g⟩: a weight gradient
            grad_w = _conv_backward(g, v, weight, ctx.args, [False, True, False])[1]
        return grad_g, grad_w, None, None


class _ConvFn(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None, args: tuple) -> Tensor:
        stride, padding, dilation, groups, _ = args
        return nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        x, weight, _, ctx.args = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if not torch.is_grad_enabled():  # first order only: the native kernel
            dx, dw, db = _conv_backward(g, x, weight, ctx.args, [need_x, need_w, need_b])
            return dx, dw, db, None
        # create_graph: x only for its shape; its own derivative is never needed (linear in x)
        dx = _ConvInputGrad.apply(g, weight, x.detach(), ctx.args) if need_x else None
        dw = db = None
        if need_w:  # weight gradients with create_graph (input-gradient regularizers never ask)
            dw = _conv_weight_grad(g, x, weight, ctx.args)
        if need_b:
            db = g.sum((0, 2, 3))
        return dx, dw, db, None


def _conv_weight_grad(g: Tensor, x: Tensor, weight: Tensor, args: tuple) -> Tensor:
    """Differentiable weight gradient: autograd of conv2d in its weight, with create_graph."""
    stride, padding, dilation, groups, _ = args
    w = weight.detach().requires_grad_(True)
    with torch.enable_grad():
        out = nn.functional.conv2d(x, w, None, stride, padding, dilation, groups)
        return torch.autograd.grad(out, w, g, create_graph=True)[0]


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d`` whose double backward uses the ordinary weight-gradient kernel.

    Zero padding only (other padding modes use the plain layer).

    Example:
        >>> Conv2d(1, 4, 3, padding=1)(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 4, 8, 8])
    """

    def forward(self, x: Tensor) -> Tensor:
        """Cross-correlation of ``x`` [N, C, H, W] with the weight, plus bias."""
        return self.conv(x, self.weight, self.bias)

    def conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """This layer's convolution with another ``weight`` [C_out, C_in/groups, kH, kW] and
        ``bias`` [C_out] (or None) — derived from its own, e.g. rescaled, so that a scalar
        multiplier and bias after the convolution cost no pass over the activations."""
        large = x.numel() * self.out_channels >= MIN_ELEMENTS * self.in_channels  # output size
        if self.padding_mode != "zeros" or isinstance(self.padding, str) or x.dim() != 4 \
                or _native(x, large):
            return self._conv_forward(x, weight, bias)
        bias_size = [self.out_channels] if bias is not None else None
        args = (list(self.stride), list(self.padding), list(self.dilation), self.groups,
                bias_size)
        return _ConvFn.apply(x, weight, bias, args)
