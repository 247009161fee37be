"""DVERGE (ensdiv/dverge.py): the distillation against a hand-written MI-FGSM loop, the loss
against its definition, the layer schedule; layer_features of every architecture."""

import pytest
import torch
import torch.nn.functional as F

from ensdiv.dverge import (
    DvergeLoss,
    distill,
    dverge_loss,
    feature_distance,
    source_permutation,
)
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.models import LAYERS, build_model


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)),
                                        ("resnet20", (3, 8, 8))])
def test_distilled_points_stay_in_the_ball_and_lower_the_feature_distance(arch, shape):
    torch.manual_seed(0)
    net = build_model(arch, in_shape=shape, num_classes=10)
    source, target = torch.rand(8, *shape), torch.rand(8, *shape)
    for layer in sorted({1, LAYERS[arch] // 2 + 1, LAYERS[arch]}):
        z = distill(net, source, target, layer=layer, eps=0.07, steps=10)
        assert float((z - source).abs().max()) <= 0.07 + 1e-6
        assert z.min() >= 0 and z.max() <= 1
        goal = net.layer_features(target, layer).detach()
        with torch.no_grad():
            before = feature_distance(net, source, goal, layer)
            after = feature_distance(net, z, goal, layer)
        assert float(after.mean()) < 0.95 * float(before.mean()), (arch, layer)


def test_distill_equals_a_hand_written_mi_fgsm_loop():
    torch.manual_seed(1)
    net = build_model("cnn", in_shape=(1, 8, 8), num_classes=10)
    source, target = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    eps, alpha = 0.1, 0.01
    goal = net.layer_features(target, 2).detach()
    z, g = source.clone(), torch.zeros_like(source)
    for _ in range(5):
        zz = z.clone().requires_grad_(True)
        loss = sum(F.mse_loss(net.layer_features(zz[i:i + 1], 2), goal[i:i + 1],
                              reduction="mean") for i in range(4))
        (grad,) = torch.autograd.grad(loss, zz)
        for i in range(4):  # per-sample L1 normalisation, momentum 1
            g[i] = g[i] + grad[i] / grad[i].abs().sum()
        z = torch.clamp(torch.min(torch.max(z - alpha * g.sign(), source - eps), source + eps),
                        0, 1).detach()
    got = distill(net, source, target, layer=2, eps=eps, steps=5, alpha=alpha)
    assert torch.allclose(got, z, atol=1e-6)


def test_source_permutation_never_pairs_an_image_with_itself():
    for b in (2, 3, 17):
        for seed in range(5):
            src = source_permutation(b, generator=torch.Generator().manual_seed(seed))
            assert sorted(src.tolist()) == list(range(b))
            assert all(int(src[i]) != i for i in range(b))


@pytest.mark.parametrize("members", [2, 3, 5])
def test_dverge_loss_equals_its_definition(members):
    ens = Ensemble.build("cnn", members, in_shape=(1, 8, 8), num_classes=10, seed=3)
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6)
    torch.manual_seed(7)
    loss, stats = dverge_loss(ens, x, y, layer=2, eps=0.05, steps=3, lam=0.5,
                              clean_weight=0.25)
    torch.manual_seed(7)  # the same pairing
    src = source_permutation(6)
    zs = [distill(m, x[src], x, layer=2, eps=0.05, steps=3) for m in ens.members]
    want = sum(0.5 * F.cross_entropy(mj(zs[i]), y[src])
               for j, mj in enumerate(ens.members) for i in range(members) if i != j)
    want = want + 0.25 * sum(F.cross_entropy(m(x), y) for m in ens.members)
    assert torch.allclose(loss, want, rtol=1e-5)
    # member j learns only from its own loss: the distilled points are constants
    got = torch.autograd.grad(loss, list(ens.parameters()))
    ref = torch.autograd.grad(want, list(ens.parameters()))
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert 0 <= float(stats["feature_gap"]) < 1 and "clean_ce_0" in stats


def test_the_layer_is_drawn_anew_every_epoch_from_the_seed():
    ens = Ensemble.build("resnet20", 2, in_shape=(3, 8, 8), num_classes=10, seed=0)
    a, b = DvergeLoss(ens, seed=0), DvergeLoss(ens, seed=0)
    layers = []
    for epoch in range(1, 13):
        a.set_epoch(epoch, 12)
        b.set_epoch(epoch, 12)
        assert a.layer == b.layer and 1 <= a.layer <= 20
        layers.append(a.layer)
    assert len(set(layers)) > 3  # re-drawn, not fixed (the TRS repo's DVERGE bug)
    fixed = DvergeLoss(ens, seed=0, layer=7)
    fixed.set_epoch(3, 12)
    assert fixed.layer == 7


def test_layer_features_end_at_the_features_and_blocks_match_the_forward_pass():
    torch.manual_seed(0)
    for arch, shape in [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("resnet20", (3, 8, 8))]:
        net = build_model(arch, in_shape=shape, num_classes=10)
        assert net.num_layers == LAYERS[arch]
        x = torch.rand(3, *shape)
        last = net.layer_features(x, net.num_layers)
        feats = net.features(x)
        assert torch.allclose(last if arch == "resnet20" else torch.relu(last), feats,
                              atol=1e-6)
    net = build_model("resnet20", in_shape=(3, 8, 8), num_classes=10)
    x = torch.rand(2, 3, 8, 8)
    z = net.normalize(x)
    for k in range(9):  # layer 2k + 3 is block k's sum before its ReLU
        after = net.body[:4 + k](z)
        assert torch.allclose(torch.relu(net.layer_features(x, 2 * k + 3)), after, atol=1e-5)
    with pytest.raises(EnsdivError, match="layer must be an integer from 1 to 20"):
        net.layer_features(x, 21)


@pytest.mark.parametrize("kwargs,message", [
    ({"eps": 0.0}, "DVERGE eps must be positive"),
    ({"eps": 2.0}, "DVERGE eps must be at most 1"),
    ({"steps": 0}, "DVERGE steps must be >= 1"),
    ({"clean_weight": -1.0}, "DVERGE clean weight must be >= 0"),
    ({"layer": 4}, "DVERGE layer 4 does not exist in cnn"),
])
def test_bad_hyper_parameters_are_one_line(kwargs, message):
    ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match=message):
        DvergeLoss(ens, seed=0, **kwargs)


def test_too_small_batches_and_single_models_are_refused():
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match="batches of at least 2 images"):
        dverge_loss(ens, torch.rand(1, 1, 8, 8), torch.arange(1), layer=1)
    one = Ensemble.build("mlp", 1, in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match="DVERGE needs at least 2 members"):
        dverge_loss(one, torch.rand(2, 1, 8, 8), torch.arange(2), layer=1)
