import pytest
import torch

from ensdiv.errors import EnsdivError
from ensdiv.models import ARCHS, build_model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_shapes_features_head(arch, shape):
    net = build_model(arch, in_shape=shape, num_classes=7, mean=[0.5] * shape[0],
                      std=[0.25] * shape[0])
    x = torch.rand(3, *shape)
    logits = net(x)
    assert logits.shape == (3, 7)
    f = net.features(x)
    assert f.ndim == 2 and f.shape[0] == 3
    assert isinstance(net.head, torch.nn.Linear)
    torch.testing.assert_close(net.head(f), logits)


@pytest.mark.parametrize("arch", ARCHS)
def test_normalization_inside(arch):
    # a model with mean/std equals the un-normalized model on pre-normalized input
    torch.manual_seed(0)
    a = build_model(arch, in_shape=(1, 8, 8), num_classes=3, mean=[0.3], std=[0.2])
    b = build_model(arch, in_shape=(1, 8, 8), num_classes=3)
    b.load_state_dict({k: v for k, v in a.state_dict().items() if "normalize" not in k},
                      strict=False)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(a(x), b((x - 0.3) / 0.2))


@pytest.mark.parametrize("arch", ARCHS)
def test_samples_independent(arch):
    # no BatchNorm coupling: a sample's output does not depend on the rest of the batch
    net = build_model(arch, in_shape=(1, 8, 8), num_classes=3).train()
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(net(x)[:1], net(x[:1]), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_bad_input():
    with pytest.raises(EnsdivError, match="cnn, cnn-nf, mlp, resnet20, resnet20-fixup"):
        build_model("vgg", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match="H, W >= 8"):
        build_model("cnn", in_shape=(1, 4, 4), num_classes=10)
    with pytest.raises(EnsdivError, match="num_classes"):
        build_model("cnn", in_shape=(1, 8, 8), num_classes=1)
    with pytest.raises(EnsdivError, match="std"):
        build_model("cnn", in_shape=(1, 8, 8), num_classes=3, mean=[0.0], std=[0.0])


@pytest.mark.parametrize("arch", ["cnn-nf", "resnet20-fixup"])
def test_normalization_free_members_have_no_normalization_layer(arch):
    net = build_model(arch, in_shape=(3, 8, 8), num_classes=3)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm)
    assert not any(isinstance(m, norms) for m in net.modules())


def test_fixup_initialization():
    """Zhang et al. 2019: each residual branch starts at zero (so a block is its shortcut),
    its first conv at He's scale times L^(-1/2), L = 9 branches; scalar biases 0, scales 1."""
    from ensdiv.models import FixupBlock

    torch.manual_seed(0)
    net = build_model("resnet20-fixup", in_shape=(3, 32, 32), num_classes=10)
    blocks = [m for m in net.modules() if isinstance(m, FixupBlock)]
    assert len(blocks) == 9
    z = torch.randn(2, 16, 8, 8)
    torch.testing.assert_close(blocks[1](z), torch.relu(z))  # identity shortcut at init
    for b in blocks:
        assert b.conv2.weight.abs().max() == 0 and b.scale.item() == 1.0
        assert all(p.bias.item() == 0 for p in (b.a1, b.b1, b.a2, b.b2))
        fan_out = b.conv1.weight.shape[0] * 9
        std = b.conv1.weight.std().item()
        assert std == pytest.approx((2 / fan_out) ** 0.5 / 3, rel=0.15)


@pytest.mark.parametrize("stride,cin", [(1, 16), (2, 8)])
def test_fixup_block_is_its_formula(stride, cin):
    """The block, with its scalars folded into the convolutions, against Fixup's formula
    relu(scale·conv2(relu(conv1(x + a1) + b1) + a2) + b2 + shortcut(x + a1)) written with
    torch.nn.functional — values, input gradient and its double backward (float64)."""
    from ensdiv.models import FixupBlock

    F = torch.nn.functional
    torch.manual_seed(0)
    b = FixupBlock(cin, 16, stride, 1 / 3).double()
    with torch.no_grad():  # away from the initialization, where conv2 = 0 and scalars are 0/1
        for p in b.parameters():
            p.add_(0.3 * torch.randn_like(p))
    s = b.scale

    def formula(x):
        xa = x + b.a1.bias
        h = F.relu(F.conv2d(xa, b.conv1.weight, None, stride, 1) + b.b1.bias) + b.a2.bias
        short = xa if stride == 1 and cin == 16 else F.conv2d(xa, b.short.weight, None, stride)
        return F.relu(s * F.conv2d(h, b.conv2.weight, None, 1, 1) + b.b2.bias + short)

    x = torch.randn(3, cin, 12, 12, dtype=torch.float64, requires_grad=True)
    for f in (b, formula):
        out = f(x)
        (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        params = torch.autograd.grad(g.square().sum(), list(b.parameters()))
        if f is b:
            want = (out, g, params)
    torch.testing.assert_close(want[0], out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(want[1], g, rtol=1e-10, atol=1e-12)
    for p, q in zip(want[2], params, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.first(x), F.conv2d(x + b.a1.bias, b.conv1.weight, None, stride, 1)
                               + b.b1.bias, rtol=1e-10, atol=1e-12)


def test_cnn_nf_is_cnn_without_its_group_norms():
    torch.manual_seed(0)
    gn = build_model("cnn", in_shape=(1, 12, 12), num_classes=4)
    nf = build_model("cnn-nf", in_shape=(1, 12, 12), num_classes=4)
    kinds = [type(m).__name__ for m in gn.body]
    assert [type(m).__name__ for m in nf.body] == [k for k in kinds if k != "GroupNorm"]
    assert nf.spec["arch"] == "cnn-nf"
    again = build_model(**nf.spec)
    again.load_state_dict(nf.state_dict())
    x = torch.rand(3, 1, 12, 12)
    torch.testing.assert_close(again(x), nf(x))


@pytest.mark.parametrize("arch", ["cnn-nf", "resnet20-fixup"])
def test_normalization_free_members_fit_a_small_batch(arch):
    """Without normalization the members still train: 60 Adam steps memorize 16 images."""
    torch.manual_seed(0)
    net = build_model(arch, in_shape=(3, 8, 8), num_classes=4)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 4, (16,))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = torch.nn.functional.cross_entropy(net(x), y).item()
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    last = torch.nn.functional.cross_entropy(net(x), y).item()
    assert last < 0.5 * first and (net(x).argmax(1) == y).float().mean() >= 0.9
