"""Tests for ensdiv.data: embedded datasets, and tiny real-format files for the folder ones."""

from __future__ import annotations

import dataclasses
import pickle
import shlex
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ensdiv.data import DATASETS, DatasetInfo, load_dataset
from ensdiv.errors import EnsdivError

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR_NAMES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
FASHION_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py"}


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write uint8 ``array`` as an uncompressed IDX file (magic 2049 for 1-D, 2051 for 3-D)."""
    magic = 0x0800 | array.ndim
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_idx_dataset(root: Path, folder: str, n_train: int = 20, n_test: int = 10) -> dict:
    rng = np.random.default_rng(1)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    arrays["train-images-idx3-ubyte"][3, 5, 7] = 200
    arrays["t10k-images-idx3-ubyte"][0, 0, 0] = 255
    for name, array in arrays.items():
        write_idx(raw / name, array)
    return arrays


def make_cifar(root: Path, per_batch: int = 4, n_test: int = 10) -> dict:
    """Write CIFAR-10 python batches as the real files load: str keys, uint8 rows of 3x32x32."""
    rng = np.random.default_rng(2)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for i, name in enumerate(CIFAR_FILES[:6]):
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in (np.arange(n) + i) % 10]
        batches[name] = (data, labels)
        entry = {
            "batch_label": f"batch {i}",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{i}_{j}.png" for j in range(n)],
        }
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    meta = {"num_cases_per_batch": per_batch, "label_names": list(CIFAR_NAMES), "num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return batches


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist5k", seed=0)


def check_splits(train, test, info: DatasetInfo) -> None:
    for split, n in ((train, info.n_train), (test, info.n_test)):
        x, y = split.tensors
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert tuple(x.shape) == (n, *info.in_shape) and tuple(y.shape) == (n,)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert y.min() >= 0 and y.max() < info.num_classes
    assert len(info.class_names) == info.num_classes
    assert len(info.mean) == len(info.std) == info.in_shape[0]
    x = train.tensors[0].double()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), correction=0)
    assert torch.allclose(torch.tensor(info.mean, dtype=torch.float64), mean, atol=1e-9)
    assert torch.allclose(torch.tensor(info.std, dtype=torch.float64), std, atol=1e-9)


def check_stratified(train, test, num_classes: int) -> None:
    y_train, y_test = train.tensors[1], test.tensors[1]
    n_train, n_test = len(y_train), len(y_test)
    c_train = torch.bincount(y_train, minlength=num_classes).double()
    c_test = torch.bincount(y_test, minlength=num_classes).double()
    total = c_train + c_test
    assert (c_train - total * n_train / (n_train + n_test)).abs().max() <= 1.0
    assert (c_test - total * n_test / (n_train + n_test)).abs().max() <= 1.0


def test_datasets_names():
    assert DATASETS == ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10")


def test_digits_shapes_and_info():
    train, test, info = load_dataset("digits")
    assert (info.name, info.in_shape, info.num_classes) == ("digits", (1, 8, 8), 10)
    assert (info.n_train, info.n_test) == (1437, 360)
    assert info.class_names == tuple(str(i) for i in range(10))
    check_splits(train, test, info)
    check_stratified(train, test, 10)
    assert train.tensors[0].max() == 1.0  # 16 / 16: scaled, not clipped


def test_digits_deterministic_per_seed():
    a_train, a_test, a_info = load_dataset("digits", seed=3)
    b_train, b_test, b_info = load_dataset("digits", seed=3)
    c_train, _, _ = load_dataset("digits", seed=4)
    for a, b in zip(
        a_train.tensors + a_test.tensors, b_train.tensors + b_test.tensors, strict=True
    ):
        assert torch.equal(a, b)
    assert a_info == b_info
    assert not torch.equal(a_train.tensors[0], c_train.tensors[0])


def test_info_is_frozen():
    _, _, info = load_dataset("digits")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "other"  # type: ignore[misc]


def test_mnist5k(mnist5k):
    train, test, info = mnist5k
    assert (info.in_shape, info.n_train, info.n_test) == ((1, 28, 28), 4000, 1000)
    check_splits(train, test, info)
    assert torch.bincount(train.tensors[1]).tolist() == [400] * 10
    assert torch.bincount(test.tensors[1]).tolist() == [100] * 10
    assert train.tensors[0].max() == 1.0


def test_mnist5k_deterministic_per_seed(mnist5k):
    again = load_dataset("mnist5k", seed=0)
    other = load_dataset("mnist5k", seed=1)
    assert torch.equal(mnist5k[0].tensors[0], again[0].tensors[0])
    assert torch.equal(mnist5k[1].tensors[1], again[1].tensors[1])
    assert not torch.equal(mnist5k[0].tensors[1], other[0].tensors[1])


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_files_round_trip(tmp_path, name):
    arrays = make_idx_dataset(tmp_path, FOLDER[name])
    train, test, info = load_dataset(name, root=tmp_path)
    assert (info.name, info.in_shape, info.n_train, info.n_test) == (name, (1, 28, 28), 20, 10)
    expected_names = tuple(str(i) for i in range(10)) if name == "mnist" else FASHION_NAMES
    assert info.class_names == expected_names
    check_splits(train, test, info)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert torch.equal(
        x_train[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]).float() / 255
    )
    assert x_train[3, 0, 5, 7].item() == pytest.approx(200 / 255)
    assert x_test[0, 0, 0, 0].item() == 1.0
    assert y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_root_from_environment(tmp_path, monkeypatch):
    make_idx_dataset(tmp_path, "MNIST")
    monkeypatch.setenv("ENSDIV_DATA", str(tmp_path))
    _, _, info = load_dataset("mnist")
    assert info.n_train == 20


def test_cifar10_round_trip(tmp_path):
    batches = make_cifar(tmp_path)
    train, test, info = load_dataset("cifar10", root=str(tmp_path))
    assert (info.in_shape, info.num_classes, info.n_train, info.n_test) == ((3, 32, 32), 10, 20, 10)
    assert info.class_names == CIFAR_NAMES
    check_splits(train, test, info)

    x_train, y_train = train.tensors
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # A row is channel-major: red 32x32 plane, then green, then blue.
    row = 5  # data_batch_2, second image
    channel, h, w = 2, 4, 9
    value = int(data[row, channel * 1024 + h * 32 + w])
    assert x_train[row, channel, h, w].item() == pytest.approx(value / 255)
    assert torch.equal(x_train, torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255)
    assert y_train.tolist() == labels

    x_test, y_test = test.tensors
    test_data, test_labels = batches["test_batch"]
    assert torch.equal(x_test, torch.from_numpy(test_data.reshape(-1, 3, 32, 32)).float() / 255)
    assert y_test.tolist() == test_labels


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_folder_names_expected_path(tmp_path, name):
    with pytest.raises(EnsdivError) as err:
        load_dataset(name, root=tmp_path)
    message = str(err.value)
    folder = tmp_path / FOLDER[name] / ("" if name == "cifar10" else "raw")
    assert str(folder.absolute()).rstrip("/") in message
    assert "never downloads" in message
    for file in CIFAR_FILES if name == "cifar10" else IDX_FILES:
        assert file in message


def test_missing_single_file_is_named(tmp_path):
    make_idx_dataset(tmp_path, "MNIST")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(EnsdivError, match=r"missing: t10k-labels-idx1-ubyte\b"):
        load_dataset("mnist", root=tmp_path)


def test_missing_cifar_meta_is_named(tmp_path):
    make_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "batches.meta").unlink()
    with pytest.raises(EnsdivError, match=r"missing: batches\.meta"):
        load_dataset("cifar10", root=tmp_path)


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b"\xff" * 16, "not an unsigned-byte IDX file: its first bytes are ffffffff"),
    (lambda b: b[:-100], "expected"),  # cut short: torchvision said only "shape ... invalid"
    (lambda b: b[:6], "the header of 3 dimensions is cut short"),
])
def test_a_damaged_idx_file_is_named_with_its_fix(tmp_path, damage, reason):
    make_idx_dataset(tmp_path, "MNIST")
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(EnsdivError) as e:
        load_dataset("mnist", root=tmp_path)
    message = str(e.value)
    assert f"{path} is damaged ({reason}" in message and "\n" not in message
    assert "ensdiv data fetch mnist --force" in message
    # the remedy with an odd data root pastes back as one word
    odd = tmp_path / "my data"
    make_idx_dataset(odd, "MNIST")
    (odd / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"\xff" * 16)
    with pytest.raises(EnsdivError) as e:
        load_dataset("mnist", root=odd)
    fix = str(e.value).split("`")[1]
    assert shlex.split(fix) == ["ensdiv", "data", "fetch", "mnist", "--force", "--root", str(odd)]


def test_unknown_name_lists_choices():
    with pytest.raises(EnsdivError) as err:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(err.value)


def test_bad_seed():
    with pytest.raises(EnsdivError, match="seed"):
        load_dataset("digits", seed=-1)
