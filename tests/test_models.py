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


@pytest.mark.parametrize("arch", ["cnn", "resnet20"])
def test_samples_independent(arch):
    # no BatchNorm coupling: a sample's output does not depend on the rest of the batch
    net = build_model(arch, in_shape=(1, 8, 8), num_classes=3).train()
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(net(x)[:1], net(x[:1]), atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in net.modules())


def test_bad_input():
    with pytest.raises(EnsdivError, match="cnn, mlp, resnet20"):
        build_model("vgg", in_shape=(1, 8, 8), num_classes=10)
    with pytest.raises(EnsdivError, match="H, W >= 8"):
        build_model("cnn", in_shape=(1, 4, 4), num_classes=10)
    with pytest.raises(EnsdivError, match="num_classes"):
        build_model("cnn", in_shape=(1, 8, 8), num_classes=1)
    with pytest.raises(EnsdivError, match="std"):
        build_model("cnn", in_shape=(1, 8, 8), num_classes=3, mean=[0.0], std=[0.0])
