import errno
import json
import os

import pytest
import torch

from ensdiv import io as eio
from ensdiv.errors import EnsdivError
from ensdiv.io import (
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_jsonl,
    read_json,
    read_jsonl,
    read_torch,
    round_floats,
    strict_json,
)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("good")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(p, boom)
    assert p.read_text() == "good"
    assert [q.name for q in tmp_path.iterdir()] == ["f.txt"]


def test_jsonl_roundtrip(tmp_path):
    recs = [{"a": 1, "b": [0.5, 2]}, {"a": 2}]
    atomic_write_jsonl(tmp_path / "r.jsonl", recs)
    assert read_jsonl(tmp_path / "r.jsonl") == recs
    assert read_jsonl(tmp_path / "none.jsonl") == []


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_open_would_give(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write_json(tmp_path / "c.json", {"a": 1})
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "w.pt")
        with open(tmp_path / "plain.txt", "w") as f:  # what the user's own files get
            f.write("x")
    finally:
        os.umask(old)
    for name in ("c.json", "w.pt", "plain.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def _no_constants(name):
    raise AssertionError(f"non-standard JSON token {name}")


def test_json_is_strict_nan_and_inf_become_null(tmp_path):
    obj = {"rate": float("nan"), "hi": float("inf"), "lo": [float("-inf"), 0.5], "n": 3}
    atomic_write_json(tmp_path / "a.json", obj)
    atomic_write_jsonl(tmp_path / "a.jsonl", [obj, obj])
    expected = {"rate": None, "hi": None, "lo": [None, 0.5], "n": 3}
    assert json.loads((tmp_path / "a.json").read_text(), parse_constant=_no_constants) == expected
    for line in (tmp_path / "a.jsonl").read_text().splitlines():
        assert json.loads(line, parse_constant=_no_constants) == expected
    assert strict_json((1.0, float("nan"))) == [1.0, None]


def test_round_floats_removes_float32_noise():
    noisy = float(torch.tensor(0.9125, dtype=torch.float32))
    assert noisy != 0.9125
    assert round_floats({"a": [noisy], "b": 7, "c": "x", "d": float("nan")})["a"] == [0.9125]
    assert round_floats(123456789.0) == 123457000.0


def test_full_disk_is_one_line_with_the_real_cause(tmp_path, monkeypatch):
    p = tmp_path / "checkpoint.pt"
    atomic_torch_save({"epoch": 1}, p)
    before = p.read_bytes()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(eio.os, "write", full)
    with pytest.raises(EnsdivError) as e:
        atomic_torch_save({"epoch": 2, "w": torch.zeros(1000)}, p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "No space left on device" in msg
    assert "then resume" in msg and e.value.remedy == "resume"  # the CLI names the command
    assert p.read_bytes() == before
    assert [q.name for q in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only"),
                                         (errno.EACCES, "may not write")])
def test_unwritable_folder_is_one_line(tmp_path, monkeypatch, code, words):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(eio.tempfile, "mkstemp", refuse)
    with pytest.raises(EnsdivError, match=words) as e:
        atomic_write_json(tmp_path / "run" / "config.json", {"a": 1})
    assert os.strerror(code) in str(e.value) and "config.json" in str(e.value)


# --------------------------------------------------------------------------- readers
def test_read_json_missing_empty_truncated_wrong_kind(tmp_path):
    p = tmp_path / "config.json"
    with pytest.raises(EnsdivError, match=r"no run config at .*config.json; do this"):
        read_json(p, what="run config", fix="do this")
    p.write_text("")
    with pytest.raises(EnsdivError, match="is empty .0 bytes., not a run config; do this"):
        read_json(p, what="run config", fix="do this")
    p.write_text('{"a": 1, "b"')
    with pytest.raises(EnsdivError, match="not a valid run config .truncated or not JSON"):
        read_json(p, what="run config", fix="do this")
    p.write_text("[1, 2]")
    with pytest.raises(EnsdivError, match="a JSON list, expected a dict"):
        read_json(p, what="run config", fix="do this")
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(EnsdivError, match="not a valid run config"):
        read_json(p, what="run config", fix="do this")


def test_read_jsonl_names_the_damaged_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"epoch": 1}\n{"epoch": 2, "lo')
    with pytest.raises(EnsdivError, match=r"m.jsonl line 2 is not valid JSON.*; fix it"):
        read_jsonl(p, what="metrics file", fix="fix it")
    p.write_text('{"epoch": 1}\n{"lam": 2}\n')
    with pytest.raises(EnsdivError, match="line 2 has no epoch, so the file is not a metrics"):
        read_jsonl(p, what="metrics file", fix="fix it", required=["epoch"])
    p.write_text("")
    assert read_jsonl(p) == []
    with pytest.raises(EnsdivError, match="no records file at"):
        read_jsonl(tmp_path / "none.jsonl", what="records file", missing_ok=False)


def test_read_torch_missing_empty_truncated_foreign(tmp_path):
    p = tmp_path / "c.pt"
    kw = {"what": "training checkpoint", "fix": "restore it", "required": ["epoch"]}
    with pytest.raises(EnsdivError, match="no training checkpoint at"):
        read_torch(p, **kw)
    p.write_bytes(b"")
    with pytest.raises(EnsdivError, match="is empty"):
        read_torch(p, **kw)
    atomic_torch_save({"epoch": 3, "w": torch.zeros(100)}, p)
    assert read_torch(p, **kw)["epoch"] == 3
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(EnsdivError, match="not a readable training checkpoint") as e:
        read_torch(p, **kw)
    assert "\n" not in str(e.value) and "restore it" in str(e.value)
    atomic_torch_save({"other": 1}, p)
    with pytest.raises(EnsdivError, match="lacks epoch"):
        read_torch(p, **kw)
    p.write_text('{"epoch": 1}')
    with pytest.raises(EnsdivError, match="not a readable training checkpoint"):
        read_torch(p, **kw)


# ------------------------------------------------------------------------ run folders
