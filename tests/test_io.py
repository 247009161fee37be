import pytest

from ensdiv.io import atomic_write, atomic_write_jsonl, is_main_process, read_jsonl


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


def test_main_process_without_distributed():
    assert is_main_process()
