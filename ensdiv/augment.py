"""Training-batch augmentations, each ``(x [B, C, H, W], generator) -> x'``: drawn from the
run's per-epoch generator for the whole batch at once (no per-image Python loop), so a run and
its resumption see exactly the same augmented batches.

- :func:`crop_flip`: the CIFAR-10 standard of every ensemble paper's recipe (DVERGE, TRS, GAL,
  ADP): zero-pad 4 pixels, take a random crop of the original size, flip horizontally with
  probability ½ — torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``.
  Refused on digit data sets (:data:`NO_FLIP`): a mirrored digit is another symbol.
- :func:`gaussian_noise`: N(0, σ²) pixel noise for randomized smoothing.
- :func:`compose`: several in order (crop-flip, then noise).

Example:
    >>> import torch
    >>> x = torch.rand(4, 3, 8, 8)
    >>> crop_flip()(x, torch.Generator().manual_seed(0)).shape
    torch.Size([4, 3, 8, 8])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ensdiv.errors import EnsdivError, check_choice, check_int

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import AUGMENTS as AUGMENTS

Augment = Callable[[Tensor, torch.Generator], Tensor]
"""An augmentation: a batch and the run's generator in, the augmented batch out."""

"""The choices of ``--augment``."""

NO_FLIP: tuple[str, ...] = ("digits", "mnist5k", "mnist")
"""Data sets ``crop-flip`` is refused on: flipping a digit changes its class (or its shape
into no digit at all)."""


def crop_flip(pad: int = 4) -> Augment:
    """Random crop of the original size from the batch zero-padded by ``pad`` pixels a side,
    then a horizontal flip with probability ½, per image.

    Each image's offsets (top, left in [0, 2·pad]) and flip are drawn from the generator in one
    call each, on the CPU, then applied by one gather on the batch's device.

    Example:
        >>> x = torch.arange(16.).view(1, 1, 4, 4)
        >>> y = crop_flip(pad=0)(x, torch.Generator().manual_seed(1))
        >>> torch.equal(y, x) or torch.equal(y, x.flip(-1))
        True
    """
    check_int("pad", pad, minimum=0)

    def augment(x: Tensor, gen: torch.Generator) -> Tensor:
        b, _, h, w = x.shape
        offsets = torch.randint(0, 2 * pad + 1, (2, b), generator=gen)
        flip = torch.rand(b, generator=gen) < 0.5
        rows = offsets[0][:, None] + torch.arange(h)  # [B, H] rows of the padded image
        cols = offsets[1][:, None] + torch.arange(w)  # [B, W]
        cols = torch.where(flip[:, None], cols.flip(1), cols)  # a flipped crop: columns reversed
        dev = x.device
        padded = F.pad(x, (pad, pad, pad, pad)).permute(0, 2, 3, 1)  # [B, H + 2p, W + 2p, C]
        out = padded[torch.arange(b, device=dev)[:, None, None], rows.to(dev)[:, :, None],
                     cols.to(dev)[:, None, :]]  # [B, H, W, C]
        return out.permute(0, 3, 1, 2).contiguous()

    return augment


def gaussian_noise(sigma: float) -> Augment | None:
    """Augmentation adding N(0, σ²) pixel noise, not clipped to [0, 1]; None for σ = 0.

    Unclipped because randomized smoothing (:mod:`ensdiv.smoothing`, Cohen et al. 2019)
    classifies x + ε with unclipped Gaussian ε: a member trained for smoothing must see that
    distribution (clipping would hide exactly the large deviations the certificate relies on).
    """
    if sigma <= 0:
        return None

    def augment(x: Tensor, gen: torch.Generator) -> Tensor:
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        return x + sigma * noise

    return augment


def compose(*augments: Augment | None) -> Augment | None:
    """The given augmentations (None ones skipped) applied in order; None if there are none.

    Example:
        >>> compose(None, None) is None
        True
    """
    chain = [a for a in augments if a is not None]
    if not chain:
        return None

    def augment(x: Tensor, gen: torch.Generator) -> Tensor:
        for a in chain:
            x = a(x, gen)
        return x

    return augment


def check_augment(name: str, dataset: str) -> None:
    """One :class:`EnsdivError` for an unknown augmentation or ``crop-flip`` on a digit data set.

    Example:
        >>> check_augment("crop-flip", "cifar10")
    """
    check_choice("augment", name, AUGMENTS)
    if name == "crop-flip" and dataset in NO_FLIP:
        raise EnsdivError(f"--augment crop-flip mirrors images, and a mirrored digit is another "
                          f"symbol: refused on {dataset} (use --augment none)")
