"""The one exception type ensdiv raises for bad input, and the checks shared at the public edge.

Every public function validates its arguments with these before any work starts, so bad input
is one :class:`EnsdivError` line (the CLI prints it and exits 2), never a traceback from deep
inside torch. The input contract (:func:`check_input`): float images [B, C, H, W] in [0, 1]
whose [C, H, W] and dtype match what the model was built for.

Importing this module does not import torch (the command line parses its arguments, and
reports their errors, before torch loads); the tensor checks import it when called.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn


class EnsdivError(ValueError):
    """Bad input to a public ensdiv function or command (unknown name, wrong shape or range).

    A subclass of ``ValueError`` so callers that already catch ``ValueError`` keep working; the
    CLI prints its message as one line and exits non-zero.

    Example:
        >>> raise EnsdivError("unknown arch 'vgg'; choose one of: cnn, mlp, resnet20")
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: unknown arch 'vgg'; choose one of: cnn, mlp, resnet20

    The message speaks Python, not command lines. Where the fix is an action a front end can
    name in its own words, ``remedy`` says which (:data:`Remedy`) and ``folder`` which run
    folder it concerns; the CLI turns them into a command (``ensdiv train --out RUN --resume``).
    """

    def __init__(self, message: str, *, remedy: Remedy | None = None,
                 folder: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.remedy = remedy
        self.folder = None if folder is None else str(folder)


Remedy = Literal["resume", "elsewhere", "retrain"]
"""What fixes an :class:`EnsdivError`: ``resume`` — run the interrupted work again, resuming;
``elsewhere`` — write to another folder; ``retrain`` — rebuild the run in ``folder`` from its
checkpoint (resume its training)."""


class EnsdivWarning(UserWarning):
    """A setting that is allowed but probably a mistake (e.g. noise sigma > 1 on [0, 1]
    pixels); the CLI prints it as one ``ensdiv: warning:`` line."""


def check_real(name: str, value: object, *, minimum: float | None = None,
               strict: bool = False) -> float:
    """Return ``value`` as a float if it is a finite real number ≥ ``minimum`` (> if
    ``strict``); NaN, ±inf, bools and non-numbers are errors.

    Example:
        >>> check_real("lam", 0.5, minimum=0)
        0.5
        >>> check_real("lr", float("inf"), minimum=0, strict=True)
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: lr must be a finite number; got inf
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EnsdivError(f"{name} must be a number; got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise EnsdivError(f"{name} must be a finite number; got {v}")
    if minimum is not None and (v < minimum or (strict and v == minimum)):
        need = "positive" if strict and minimum == 0 else f"{'>' if strict else '>='} {minimum:g}"
        raise EnsdivError(f"{name} must be {need}; got {v:g}")
    return v


def check_eps(name: str, value: object) -> float:
    """An L∞ radius on images in [0, 1]: a finite number in (0, 1], or one
    :class:`EnsdivError` (0 would attack nothing, above 1 everything) — the one check every
    command's ε goes through.

    Example:
        >>> check_eps("--eps", 0.1)
        0.1
        >>> check_eps("--eps", 2)
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: --eps must be a number in (0, 1] (pixels are in [0, 1]); got 2
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(float(value)) and 0 < float(value) <= 1):
        raise EnsdivError(f"{name} must be a number in (0, 1] (pixels are in [0, 1]); got "
                          f"{value!r}")
    return float(value)


def check_int(name: str, value: object, *, minimum: int = 1) -> int:
    """Return ``value`` if it is an integer ≥ ``minimum`` (bools are not integers here).

    Example:
        >>> check_int("epochs", 3)
        3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise EnsdivError(f"{name} must be an integer; got {value!r}")
    if value < minimum:
        raise EnsdivError(f"{name} must be >= {minimum}; got {value}")
    return int(value)


def check_unique(name: str, values: Sequence[object]) -> None:
    """Refuse a list that repeats a value (it would count one experiment twice).

    Example:
        >>> check_unique("eps", [0.1, 0.2])
    """
    seen: set[object] = set()
    for v in values:
        if v in seen:
            raise EnsdivError(f"{name} lists {v!r} twice; give each value once")
        seen.add(v)


def check_choice(kind: str, value: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise an error listing them.

    Example:
        >>> check_choice("norm", "linf", ["linf", "l2"])
        'linf'
    """
    if value not in choices:
        raise EnsdivError(f"unknown {kind} {value!r}; choose one of: {', '.join(sorted(choices))}")
    return value


def _describe(value: object) -> str:
    torch = sys.modules.get("torch")  # not loaded: value cannot be a tensor
    if torch is not None and isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return repr(value)


def check_batch(x: Tensor, y: Tensor, num_classes: int | None = None) -> None:
    """Check an input batch: ``x`` floating [B, ...] in [0, 1], ``y`` integer labels [B]
    (in ``[0, num_classes)`` when given). Raises :class:`EnsdivError` naming what is wrong.

    Example:
        >>> import torch
        >>> check_batch(torch.rand(2, 1, 8, 8), torch.tensor([0, 9]), num_classes=10)
    """
    import torch
    from torch import Tensor

    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise EnsdivError("x must be a floating-point tensor of shape [B, ...] with ndim >= 2; "
                          f"got {_describe(x)}")
    check_range(x)
    b = x.shape[0]
    if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype.is_complex \
            or y.dtype == torch.bool:
        raise EnsdivError(f"y must be an integer tensor of labels; got {_describe(y)}")
    if tuple(y.shape) != (b,):
        raise EnsdivError(f"y must have shape ({b},) to match x's batch; got {tuple(y.shape)}")
    if num_classes is not None and b > 0 and bool(((y < 0) | (y >= num_classes)).any()):
        raise EnsdivError(f"labels must lie in [0, {num_classes}) for this {num_classes}-class "
                          f"model; got values from {y.min().item()} to {y.max().item()}")


def model_input_spec(model: nn.Module) -> tuple[tuple[int, ...] | None, torch.dtype | None]:
    """The per-sample input shape [C, H, W] a model declares (``model.in_shape``: every ensdiv
    member and ensemble has one; None for other modules) and its weights' dtype (None if it has
    no floating parameter).

    Example:
        >>> import torch
        >>> model_input_spec(torch.nn.Linear(2, 3))
        (None, torch.float32)
    """
    shape = getattr(model, "in_shape", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return (tuple(int(s) for s in shape) if shape is not None else None), dtype


def check_shape(x: Tensor, in_shape: Sequence[int] | None, dtype: torch.dtype | None) -> None:
    """Cheap part of the input contract (no device sync): ``x`` is a floating tensor
    [B, *in_shape] of ``dtype``. Models call it on every forward.

    Example:
        >>> import torch
        >>> check_shape(torch.rand(2, 1, 8, 8), (1, 8, 8), torch.float32)
        >>> check_shape(torch.rand(2, 1, 28, 28), (1, 8, 8), torch.float32)
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: x has shape (2, 1, 28, 28), but the model takes ...
    """
    from torch import Tensor

    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise EnsdivError(f"x must be a floating-point tensor [B, C, H, W]; got {_describe(x)}")
    if in_shape is not None:
        want = tuple(int(s) for s in in_shape)
        if tuple(x.shape[1:]) != want or x.ndim != len(want) + 1:
            hint = ("reshape flat inputs to [B, C, H, W]" if x.ndim == 2 else
                    "was it trained on another data set?")
            raise EnsdivError(f"x has shape {tuple(x.shape)}, but the model takes [B, C, H, W] "
                              f"batches of {want} per sample ({hint})")
    if dtype is not None and x.dtype != dtype:
        raise EnsdivError(f"x is {x.dtype} but the model's weights are {dtype}; convert the "
                          f"inputs with x.to({dtype})")


def check_input(model: nn.Module, x: Tensor, y: Tensor | None = None) -> None:
    """The whole input contract of every public entry point that runs ``model`` on ``x``:
    :func:`check_shape` against the model's declared shape and dtype, pixels in [0, 1], and
    (given ``y``) integer labels [B] within the model's classes (``model.num_classes`` if
    declared).

    Example:
        >>> import torch
        >>> from ensdiv.models import build_model
        >>> net = build_model("mlp", in_shape=(1, 8, 8), num_classes=10)
        >>> check_input(net, torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 9]))
    """
    in_shape, dtype = model_input_spec(model)
    check_shape(x, in_shape, dtype)
    if y is None:
        check_range(x)
    else:
        check_batch(x, y, num_classes=getattr(model, "num_classes", None))


def check_range(x: Tensor) -> None:
    """Pixels must lie in [0, 1] (models normalize inside themselves).

    Example:
        >>> import torch
        >>> check_range(torch.rand(2, 3))
    """
    inside = (x >= 0) & (x <= 1)
    if not bool(inside.all()):
        bad = x[~inside]
        raise EnsdivError(f"x must lie in [0, 1] (pixel space; models normalize inside); found "
                          f"{bad.numel()} values outside, e.g. {bad.flatten()[0].item()}")
