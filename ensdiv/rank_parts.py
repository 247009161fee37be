"""One records file written by several ``torchrun`` ranks: each rank appends its own records to
its own part file (``records.rank1.jsonl``), and at the end rank 0 merges the parts into the
file. A resumed run counts the records of the file and of any part left by a killed run as done.

Outside a process group every function here works on the file alone (a world of 1).

Example:
    >>> from pathlib import Path
    >>> rank_part(Path("out/records.jsonl"), 1).name
    'records.rank1.jsonl'
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ensdiv import distributed
from ensdiv.io import atomic_write_jsonl


def rank_part(path: Path, rank: int) -> Path:
    """Rank ``rank``'s part of the records file ``path`` under torchrun (records.rank1.jsonl)."""
    return path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def rank_parts(path: Path) -> list[Path]:
    """The part files of ``path`` that ranks of a distributed run left, merged or not yet."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"))


def read_with_parts(path: Path, read: Callable[[Path], list[dict]]) -> list[dict]:
    """The records of ``path`` and of its part files (what a resumed run counts as done)."""
    return [r for p in [path, *rank_parts(path)] if p.exists() for r in read(p)]


def merge_rank_parts(path: Path, read: Callable[[Path], list[dict]],
                     key: Callable[[dict], Any]) -> list[dict]:
    """Merge the ranks' part files into ``path`` and return its records sorted by ``key``.

    Every rank waits for the others; rank 0 writes ``path`` (one record per key, a part's
    over the file's) atomically and deletes the parts; then every rank reads the result.
    Without part files or a process group this just reads ``path``.
    """
    distributed.barrier()
    if distributed.rank_and_world()[0] == 0 and rank_parts(path):
        merged = {key(r): r for r in read_with_parts(path, read)}
        atomic_write_jsonl(path, sorted(merged.values(), key=key))
        for part in rank_parts(path):
            part.unlink()
    distributed.barrier()
    return read(path) if path.exists() else []
