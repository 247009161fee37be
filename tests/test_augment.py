"""ensdiv.augment against torchvision, image by image; reproducible from the generator."""

import pytest
import torch
import torchvision.transforms.functional as TF

from ensdiv.augment import check_augment, compose, crop_flip, gaussian_noise
from ensdiv.errors import EnsdivError


def test_crop_flip_is_torchvisions_random_crop_and_flip_with_the_same_draws():
    x = torch.rand(64, 3, 32, 32)
    out = crop_flip(pad=4)(x, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)  # the same draws, in crop_flip's order
    offsets = torch.randint(0, 9, (2, 64), generator=g)
    flips = torch.rand(64, generator=g) < 0.5
    for i in range(64):
        # torchvision's RandomCrop(32, padding=4) at these offsets, then RandomHorizontalFlip
        ref = TF.crop(TF.pad(x[i], [4]), int(offsets[0, i]), int(offsets[1, i]), 32, 32)
        if flips[i]:
            ref = TF.hflip(ref)
        assert torch.equal(out[i], ref), i
    assert 0 < int(flips.sum()) < 64 and len(set(offsets[0].tolist())) > 1


def test_crop_flip_is_reproducible_and_keeps_shape_and_dtype():
    x = torch.rand(8, 1, 28, 28, dtype=torch.float64)
    a = crop_flip()(x, torch.Generator().manual_seed(0))
    b = crop_flip()(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    assert not torch.equal(a, crop_flip()(x, torch.Generator().manual_seed(1)))


def test_gaussian_noise_augment():
    assert gaussian_noise(0.0) is None
    aug = gaussian_noise(0.1)
    x = torch.full((100, 1, 8, 8), 0.98)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.max() > 1  # not clipped: smoothing certifies under unclipped noise
    assert (out - x).std().item() == pytest.approx(0.1, rel=0.05)
    assert (out - x).mean().item() == pytest.approx(0.0, abs=0.01)
    again = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_compose_applies_in_order():
    x = torch.rand(4, 3, 8, 8)
    both = compose(crop_flip(), gaussian_noise(0.1))
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(both(x, g1), gaussian_noise(0.1)(crop_flip()(x, g2), g2))
    assert compose(None) is None


def test_crop_flip_is_refused_on_digits_with_one_line():
    for name in ("digits", "mnist5k", "mnist"):
        with pytest.raises(EnsdivError, match=f"refused on {name}"):
            check_augment("crop-flip", name)
    check_augment("crop-flip", "fashion-mnist")
    with pytest.raises(EnsdivError, match="unknown augment 'mixup'; choose one of: crop-flip"):
        check_augment("mixup", "cifar10")
