import pytest
import torch
import torch.nn.functional as F

from ensdiv import layers
from ensdiv.data import load_dataset
from ensdiv.models import build_model


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # CLI calls set the global thread count (--threads); CPU float reductions depend on it, so
    # every test starts from the same count and leaves it as found.
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(threads)
    layers.use_compiled_kernels(False)  # `ensdiv train` sets "auto"; each test starts off


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny models (two shared cores only fight)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits_model():
    """An MLP trained on sklearn digits (> 90% test accuracy) and the test images it classifies
    correctly: a real model in a regime where attack strength shows."""
    torch.manual_seed(0)
    train, test, _ = load_dataset("digits", seed=0)
    xtr, ytr = train.tensors
    model = build_model("mlp", in_shape=(1, 8, 8), num_classes=10, mean=(xtr.mean().item(),),
                        std=(xtr.std().item(),))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(15):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    xte, yte = test.tensors
    with torch.no_grad():
        correct = model(xte).argmax(1) == yte
    assert float(correct.float().mean()) > 0.9
    return model, xte[correct], yte[correct]


@pytest.fixture(scope="session")
def digits_gal_ensemble():
    """Three GAL-trained (λ = 3) MLPs on sklearn digits, the test images the
    ensemble classifies correctly, and their labels: a diverse ensemble whose averaged output
    hides its members' gradients."""
    from ensdiv.training import TrainConfig, train

    data = load_dataset("digits", seed=0)
    config = TrainConfig(dataset="digits", arch="mlp", members=3, epochs=15, diversity="gal",
                         lam=3.0, seed=0)
    with torch.random.fork_rng(devices=[]):
        ens, _ = train(config, data, progress=False)
    xte, yte = data[1].tensors
    with torch.no_grad():
        correct = ens.predict(xte) == yte
    return ens, xte[correct], yte[correct]
