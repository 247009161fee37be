"""Where computation runs: the device and the number of CPU threads, checked at the edge.

A device that is named but missing (``cuda`` on a machine without a GPU) is reported as such,
before any file is read, never as a damaged file later. Two runs on one small machine fight
for cores unless each is told how many threads to use (:func:`set_threads`).

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ensdiv.errors import EnsdivError

if TYPE_CHECKING:
    import torch


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1.

    Example:
        >>> available_cores() >= 1
        True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """The intra-op threads a command uses when not told: ``$OMP_NUM_THREADS`` where it is set
    to a whole number ≥ 1 (the variable every OpenMP program, torch included, reads), else
    :func:`available_cores`.

    Example:
        >>> default_threads() >= 1
        True
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    return available_cores()


def set_threads(n: int | None) -> int:
    """Use ``n`` CPU threads for torch's intra-op work (default: :func:`default_threads`).

    Example:
        >>> set_threads(1)
        1
    """
    if n is None:
        n = default_threads()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise EnsdivError(f"threads must be an integer >= 1; got {n!r}")
    import torch  # here, not at the top: the command line imports this module before torch

    torch.set_num_threads(n)
    return n


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The device to run on: ``name`` checked to exist, or cuda if available, else cpu.

    Raises:
        EnsdivError: an unknown device name, or a GPU that this machine does not have.

    Example:
        >>> resolve_device(None).type in ("cpu", "cuda")
        True
    """
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise EnsdivError(f"unknown device {str(name)!r}; choose one of: cpu, cuda, "
                          "cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise EnsdivError(f"unknown device {str(name)!r}; choose one of: cpu, cuda, cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EnsdivError(f"device {str(name)!r} requested, but this machine has no usable "
                              "CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EnsdivError(f"device {str(name)!r} requested, but this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
    return dev
