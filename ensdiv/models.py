"""Member architectures: small, sample-independent, normalizing inside themselves.

Every model takes pixel-space inputs in [0, 1] of shape [B, C, H, W], normalizes them with the
data set's per-channel mean/std inside (so attacks and noise work in pixel space), and returns
logits [B, num_classes]. Each exposes ``features(x) -> [B, F]`` (the penultimate representation)
and a linear ``head`` (``logits = head(features(x))``) so representations can be matched.

Normalization layers are GroupNorm: train-mode BatchNorm couples the samples of a batch, which
breaks per-sample input gradients and ``vmap`` over samples. ``cnn-nf`` and ``resnet20-fixup``
have none (GroupNorm's double backward is the dearest part of a diversity step; Fixup's
initialization lets the residual net train without it). Convolutions, GroupNorm, ReLU and
max pooling are :mod:`ensdiv.layers`' drop-ins for the ``torch.nn`` ones (same parameters and
numbers) whose double backward is cheaper, which is what gradient-diversity training pays for.

Example:
    >>> import torch
    >>> net = build_model("cnn", in_shape=(1, 8, 8), num_classes=10)
    >>> net(torch.rand(4, 1, 8, 8)).shape
    torch.Size([4, 10])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ensdiv.errors import EnsdivError, check_choice, check_shape
from ensdiv.layers import Conv2d, GroupNorm, MaxPool2d, ReLU

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import ARCHS as ARCHS
from ensdiv.vocab import Arch as Arch

LAYERS: dict[str, int] = {"mlp": 2, "cnn": 3, "cnn-nf": 3, "resnet20": 20, "resnet20-fixup": 20}
"""Hidden layers of each architecture that :meth:`Member.layer_features` can stop at."""


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a layer, with mean/std kept as buffers.

    Example:
        >>> Normalize((0.5,), (0.25,))(torch.ones(1, 1, 2, 2)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize ``x`` [B, C, H, W]."""
        return (x - self.mean) / self.std


class Member(nn.Module):
    """Base of all members: ``forward(x) = head(features(x))`` on pixel-space input.

    A member knows its per-sample input shape ``in_shape`` (C, H, W) and ``num_classes``, and
    refuses any other input shape or dtype with one :class:`EnsdivError` line (never a silent
    result on images of another size). :attr:`spec` is everything :func:`build_model` needs to
    rebuild it, so any member can be saved in an ensemble and loaded back.
    """

    head: nn.Linear

    def __init__(self, arch: str, in_shape: Sequence[int], num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.arch = arch
        self.in_shape: tuple[int, ...] = tuple(int(s) for s in in_shape)
        self.num_classes = int(num_classes)
        self.normalize = Normalize(mean, std)

    @property
    def spec(self) -> dict[str, Any]:
        """JSON-able ``build_model`` arguments that rebuild this member (weights aside)."""
        return {"arch": self.arch, "in_shape": list(self.in_shape),
                "num_classes": self.num_classes,
                "mean": [float(v) for v in self.normalize.mean.flatten().tolist()],
                "std": [float(v) for v in self.normalize.std.flatten().tolist()]}

    def embed(self, z: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Map a normalized input to the penultimate representation."""
        raise NotImplementedError

    def features(self, x: Tensor) -> Tensor:
        """Penultimate representation [B, F] of pixel-space ``x`` [B, C, H, W]."""
        check_shape(x, self.in_shape, self.normalize.mean.dtype)
        return self.embed(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        """Logits [B, num_classes] of pixel-space ``x`` [B, C, H, W]."""
        return self.head(self.features(x))

    @property
    def num_layers(self) -> int:
        """How many hidden layers :meth:`layer_features` can stop at (1 … num_layers)."""
        return len(self._cuts())

    def layer_features(self, x: Tensor, layer: int) -> Tensor:
        """The representation of pixel-space ``x`` after hidden layer ``layer`` (1-based,
        counted from the input), taken *before* that layer's ReLU as DVERGE does; the last
        layer is the penultimate representation :meth:`features` (before its ReLU where it
        has one). Shapes: [B, C', H', W'] for convolutional layers, [B, F] otherwise.

        Layers: ``mlp`` 2 (the two hidden linear layers), ``cnn`` and ``cnn-nf`` 3 (the two
        conv (+ GroupNorm) blocks and the FC layer), ``resnet20`` and ``resnet20-fixup`` 20 (the
        stem, then two per basic block — the first conv + norm (+ bias), and the block's sum
        before its ReLU — then the pooled features; the numbering of DVERGE's ResNet-20, Yang
        et al. 2020, for layers 1–19, whose layer 20 is the logits where ensdiv's is the
        pooled features).

        Example:
            >>> net = build_model("cnn", in_shape=(1, 8, 8), num_classes=10)
            >>> net.num_layers, net.layer_features(torch.rand(2, 1, 8, 8), 1).shape
            (3, torch.Size([2, 32, 8, 8]))
        """
        cuts = self._cuts()
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= len(cuts):
            raise EnsdivError(f"layer must be an integer from 1 to {len(cuts)} for "
                              f"{self.arch}; got {layer!r}")
        check_shape(x, self.in_shape, self.normalize.mean.dtype)
        return cuts[layer - 1](self.normalize(x))

    def _cuts(self) -> list[Any]:
        """One function per hidden layer: normalized input -> that layer's pre-ReLU output."""
        raise NotImplementedError  # pragma: no cover - abstract


def _prefix(body: nn.Sequential, stops: Sequence[int]) -> list[Any]:
    """For a Sequential body, functions running ``body[:k]`` for each k in ``stops``."""
    return [lambda z, k=k: body[:k](z) for k in stops]


class MLP(Member):
    """Two hidden layers of width ``hidden`` with ReLU; features are the second hidden layer."""

    def __init__(self, in_shape: Sequence[int], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], hidden: int = 256) -> None:
        super().__init__("mlp", in_shape, num_classes, mean, std)
        c, h, w = in_shape
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, hidden), ReLU(),
            nn.Linear(hidden, hidden), ReLU(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def embed(self, z: Tensor) -> Tensor:
        """Hidden representation [B, hidden]."""
        return self.body(z)

    def _cuts(self) -> list[Any]:
        return _prefix(self.body, (2, 4))  # after each Linear, before its ReLU


def _gn(channels: int) -> GroupNorm:
    return GroupNorm(min(8, channels), channels)


class CNN(Member):
    """A small LeNet-like net: two conv-GN-ReLU-maxpool blocks, adaptive pooling, one FC layer.

    Adaptive pooling to 4×4 makes it work from 8×8 inputs (digits) up to 32×32 (CIFAR).
    ``norm=False`` (architecture ``cnn-nf``) drops the two GroupNorms (the convolutions keep
    the biases they have in ``cnn``) — the plain conv nets of the GAL paper's MNIST experiments
    (Kariyappa & Qureshi 2019) — whose double backward skips GroupNorm's, the dearest part of
    the GAL step.
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], width: int = 32, feat_dim: int = 128,
                 norm: bool = True) -> None:
        super().__init__("cnn" if norm else "cnn-nf", in_shape, num_classes, mean, std)
        c = in_shape[0]

        def block(cin: int, cout: int) -> list[nn.Module]:
            conv = [Conv2d(cin, cout, 3, padding=1)]
            return conv + ([_gn(cout)] if norm else []) + [ReLU(), MaxPool2d(2)]

        self.body = nn.Sequential(
            *block(c, width), *block(width, 2 * width),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, feat_dim), ReLU(),
        )
        self.head = nn.Linear(feat_dim, num_classes)

    def embed(self, z: Tensor) -> Tensor:
        """Representation [B, feat_dim] after the FC layer."""
        return self.body(z)

    def _cuts(self) -> list[Any]:
        # before each ReLU: after each block's GroupNorm (its conv in cnn-nf) and the FC layer
        return _prefix(self.body, [i for i, m in enumerate(self.body) if isinstance(m, ReLU)])


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) with GroupNorm and an option-B 1×1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.n1 = _gn(cout)
        self.conv2 = Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.n2 = _gn(cout)
        self.relu = ReLU()
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(Conv2d(cin, cout, 1, stride, bias=False), _gn(cout))

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output."""
        return self.relu(self.pre_relu(x))

    def first(self, x: Tensor) -> Tensor:
        """The first conv + norm, before its ReLU."""
        return self.n1(self.conv1(x))

    def pre_relu(self, x: Tensor) -> Tensor:
        """The block's residual sum, before its final ReLU."""
        return self.n2(self.conv2(self.relu(self.first(x)))) + self.short(x)


class Bias(nn.Module):
    """A learned scalar added to its input (Fixup's bias; zero at initialization)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        """``x + bias``."""
        return x + self.bias


def _conv_with(conv: nn.Conv2d, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv``'s convolution with another weight and bias — through ensdiv's double-backprop
    path where ``conv`` is an :class:`ensdiv.layers.Conv2d`, else torch's (a model whose layers
    were swapped for ``torch.nn``'s)."""
    if isinstance(conv, Conv2d):
        return conv.conv(x, weight, bias)
    return conv._conv_forward(x, weight, bias)


class FixupBlock(nn.Module):
    """Basic block without normalization, initialized as Fixup (Zhang, Dauphin & Ma 2019).

    ``relu(scale·conv2(relu(conv1(x + a1) + b1) + a2) + b2 + shortcut(x + a1))`` with learned
    scalars a1, b1, a2, b2 (zero) and ``scale`` (one); ``conv2`` starts at zero, so each block
    starts as its shortcut, and ``conv1`` starts at He's scale times ``branch_scale``
    (L^(−1/2) for L residual branches of two layers each). The scalars after a convolution
    (b1; scale and b2) are folded into that convolution's weight and bias, and ``x + a1`` is
    computed once for branch and shortcut — the same function with four passes fewer over the
    activations (a1 and a2 precede a zero-padded convolution, so they cannot be folded).
    """

    def __init__(self, cin: int, cout: int, stride: int, branch_scale: float) -> None:
        super().__init__()
        self.a1, self.b1, self.a2, self.b2 = Bias(), Bias(), Bias(), Bias()
        self.conv1 = Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.scale = nn.Parameter(torch.ones(()))
        self.relu = ReLU()
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = Conv2d(cin, cout, 1, stride, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        with torch.no_grad():
            self.conv1.weight.mul_(branch_scale)
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        """Residual block output."""
        return self.relu(self.pre_relu(x))

    def first(self, x: Tensor) -> Tensor:
        """The first conv (and its bias), before its ReLU."""
        return self._first(self.a1(x))

    def _first(self, xa: Tensor) -> Tensor:
        # b1 rides in the convolution's bias: one pass less over the activations each way
        return _conv_with(self.conv1, xa, self.conv1.weight,
                          self.b1.bias.expand(self.conv1.out_channels))

    def pre_relu(self, x: Tensor) -> Tensor:
        """The block's residual sum, before its final ReLU."""
        xa = self.a1(x)
        # scale·conv2(h) + b2 = conv2 with weight scale·W and bias b2: the scalars cost a pass
        # over the (small) weight, not over the activations
        branch = _conv_with(self.conv2, self.a2(self.relu(self._first(xa))),
                            self.conv2.weight * self.scale,
                            self.b2.bias.expand(self.conv2.out_channels))
        return branch + self.short(xa)


class ResNet20(Member):
    """CIFAR-style ResNet-20 (He et al. 2016): 3 stages × 3 blocks, 16/32/64 channels.

    ``fixup=True`` (architecture ``resnet20-fixup``): the same stages, widths, strides and layer
    numbering without any normalization layer, trained from a Fixup initialization (Zhang,
    Dauphin & Ma, ICLR 2019) — every GroupNorm is gone, which is what makes its double backward
    (GAL, cos, GDR, DRT, TRS) cheap. Follows the authors' CIFAR ResNets in the scalar biases and
    multipliers and in the initialization of the residual branches (:class:`FixupBlock`).
    Departs from them in two places: the shortcut of a down-sampling block is a 1×1 convolution
    (theirs: average pooling and zero channels), as in ensdiv's ``resnet20``; and the classifier
    keeps PyTorch's default initialization (theirs: zero) — a zero classifier would give every
    member a zero input gradient at the first step, where a diversity term has no direction.

    Example:
        >>> net = build_model("resnet20-fixup", in_shape=(3, 8, 8), num_classes=10)
        >>> net(torch.rand(2, 3, 8, 8)).shape, net.num_layers
        (torch.Size([2, 10]), 20)
    """

    def __init__(self, in_shape: Sequence[int], num_classes: int, mean: Sequence[float],
                 std: Sequence[float], width: int = 16, fixup: bool = False) -> None:
        super().__init__("resnet20-fixup" if fixup else "resnet20", in_shape, num_classes, mean,
                         std)
        stem = Conv2d(in_shape[0], width, 3, 1, 1, bias=False)
        if fixup:
            nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")
        layers: list[nn.Module] = [stem, Bias() if fixup else _gn(width), ReLU()]
        cin, branches = width, 9  # 3 stages × 3 residual branches
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for block in range(3):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(FixupBlock(cin, cout, stride, branches ** -0.5) if fixup
                              else BasicBlock(cin, cout, stride))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()] + ([Bias()] if fixup else [])
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def embed(self, z: Tensor) -> Tensor:
        """Globally pooled representation [B, 4·width]."""
        return self.body(z)

    def _cuts(self) -> list[Any]:
        stem, blocks, pool = self.body[:2], list(self.body[3:12]), self.body[12:]
        relu = self.body[2]

        def run(z: Tensor, upto: int) -> Tensor:  # the input of block `upto`
            z = relu(stem(z))
            for block in blocks[:upto]:
                z = block(z)
            return z

        cuts: list[Any] = [stem]
        for i, block in enumerate(blocks):
            cuts.append(lambda z, i=i, b=block: b.first(run(z, i)))
            cuts.append(lambda z, i=i, b=block: b.pre_relu(run(z, i)))
        cuts.append(lambda z: pool(run(z, len(blocks))))
        return cuts


_ARCH_CLASSES: dict[str, Callable[..., Member]] = {
    "mlp": MLP, "cnn": CNN, "cnn-nf": functools.partial(CNN, norm=False),
    "resnet20": ResNet20, "resnet20-fixup": functools.partial(ResNet20, fixup=True)}


def build_model(arch: str, *, in_shape: Sequence[int], num_classes: int,
                mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> Member:
    """Build one member network.

    Args:
        arch: one of ``ARCHS`` ("mlp", "cnn", "resnet20").
        in_shape: (C, H, W) of the pixel-space input; H, W ≥ 8.
        num_classes: number of logits (≥ 2).
        mean, std: per-channel normalization constants (default 0 and 1: no normalization).

    Returns:
        A :class:`Member` mapping [B, C, H, W] in [0, 1] to logits [B, num_classes].

    Example:
        >>> build_model("mlp", in_shape=(1, 8, 8), num_classes=10).head.out_features
        10
    """
    check_choice("arch", arch, ARCHS)
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape[1:]) < 8 or in_shape[0] < 1:
        raise EnsdivError(f"in_shape must be (C, H, W) with H, W >= 8; got {in_shape}")
    if num_classes < 2:
        raise EnsdivError(f"num_classes must be >= 2; got {num_classes}")
    c = in_shape[0]
    mean = tuple(mean) if mean is not None else (0.0,) * c
    std = tuple(std) if std is not None else (1.0,) * c
    if len(mean) != c or len(std) != c:
        raise EnsdivError(f"mean/std need {c} channel values; got {len(mean)} and {len(std)}")
    if min(std) <= 0:
        raise EnsdivError(f"std must be positive; got {std}")
    return _ARCH_CLASSES[arch](in_shape, num_classes, mean, std)
