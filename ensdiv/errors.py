"""The one exception type ensdiv raises for bad input, and the checks shared at the public edge."""

from __future__ import annotations

import torch
from torch import Tensor


class EnsdivError(ValueError):
    """Bad input to a public ensdiv function or command (unknown name, wrong shape or range).

    A subclass of ``ValueError`` so callers that already catch ``ValueError`` keep working; the
    CLI prints its message as one line and exits non-zero.

    Example:
        >>> raise EnsdivError("unknown arch 'vgg'; choose one of: cnn, mlp, resnet20")
        Traceback (most recent call last):
        ...
        ensdiv.errors.EnsdivError: unknown arch 'vgg'; choose one of: cnn, mlp, resnet20
    """


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
    if isinstance(value, Tensor):
        return f"tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    return repr(value)


def check_batch(x: Tensor, y: Tensor, num_classes: int | None = None) -> None:
    """Check an input batch: ``x`` floating [B, ...] in [0, 1], ``y`` integer labels [B]
    (in ``[0, num_classes)`` when given). Raises :class:`EnsdivError` naming what is wrong.

    Example:
        >>> import torch
        >>> check_batch(torch.rand(2, 1, 8, 8), torch.tensor([0, 9]), num_classes=10)
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise EnsdivError("x must be a floating-point tensor of shape [B, ...] with ndim >= 2; "
                          f"got {_describe(x)}")
    inside = (x >= 0) & (x <= 1)
    if not bool(inside.all()):
        bad = x[~inside]
        raise EnsdivError(f"x must lie in [0, 1] (pixel space; models normalize inside); found "
                          f"{bad.numel()} values outside, e.g. {bad.flatten()[0].item()}")
    b = x.shape[0]
    if not isinstance(y, Tensor) or y.dtype.is_floating_point or y.dtype.is_complex \
            or y.dtype == torch.bool:
        raise EnsdivError(f"y must be an integer tensor of labels; got {_describe(y)}")
    if tuple(y.shape) != (b,):
        raise EnsdivError(f"y must have shape ({b},) to match x's batch; got {tuple(y.shape)}")
    if num_classes is not None and b > 0 and bool(((y < 0) | (y >= num_classes)).any()):
        raise EnsdivError(f"labels must lie in [0, {num_classes}) for this {num_classes}-class "
                          f"model; got values from {y.min().item()} to {y.max().item()}")
