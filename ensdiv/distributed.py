"""Data parallelism on ``torch.distributed``: process group, gradient all-reduce, sharding.

ensdiv scales out with PyTorch's own engine, started by ``torchrun``
(``torchrun --nproc-per-node N -m ensdiv train ...``): every rank holds the whole ensemble and
computes on its slice of each global batch; gradients are averaged with one coalesced
all-reduce per step. The gradient-diversity regularizers are per-sample means, so the averaged
gradient is the single-process one (up to float reduction order). ``DistributedDataParallel``
is not used: it does not support the double backward of gradient-diversity training; one
all-reduce over all parameters' gradients is the equivalent, and what DDP's buckets do.

Outside ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment) everything here is a no-op:
rank 0 of a world of 1.

Example:
    >>> rank_and_world()
    (0, 1)
    >>> shard(list(range(7)), 1, 3)
    [1, 4]
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
from torch import Tensor
from torch import distributed as dist

from ensdiv.errors import EnsdivError

T = TypeVar("T")

#: Seconds a collective waits for the other ranks before failing (``ENSDIV_DIST_TIMEOUT``): a
#: rank that died or hangs makes the others fail loudly instead of waiting forever.
DEFAULT_TIMEOUT_S = 300.0


def timeout_seconds() -> float:
    """The process group's collective timeout (``ENSDIV_DIST_TIMEOUT`` or the default)."""
    raw = os.environ.get("ENSDIV_DIST_TIMEOUT", "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise EnsdivError(f"ENSDIV_DIST_TIMEOUT must be seconds; got {raw!r}") from None
    if not value > 0:
        raise EnsdivError(f"ENSDIV_DIST_TIMEOUT must be > 0; got {raw!r}")
    return value


def launched() -> bool:
    """Whether this process was started by torchrun (or similar) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_INDEPENDENT = {"depth": 0}


def active() -> bool:
    """Whether a process group is initialized (and not set aside by :func:`independent`)."""
    return _INDEPENDENT["depth"] == 0 and dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if not active():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    """Whether this process writes shared files: rank 0, or any rank inside
    :func:`independent`."""
    return rank_and_world()[0] == 0


@contextlib.contextmanager
def independent() -> Iterator[None]:
    """Inside the block this rank works alone, as a world of one: it trains without
    all-reduce and writes its own files (a sweep's ranks train different ensembles)."""
    _INDEPENDENT["depth"] += 1
    try:
        yield
    finally:
        _INDEPENDENT["depth"] -= 1


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``…):
    backend ``nccl`` for CUDA, ``gloo`` for CPU, with :func:`timeout_seconds`. Returns the
    device this rank computes on (``cuda:LOCAL_RANK`` on GPUs). A no-op when not launched.
    """
    if not launched() or active():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # torch._dynamo (torchvision imports it) imported *after* the group exists keeps
    # references to it that outlive destroy_process_group: gloo's threads then stay alive and
    # abort the interpreter at exit (SIGABRT, "terminate called without an active exception").
    importlib.import_module("torch._dynamo")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()))
    return device


def shutdown() -> None:
    """Leave the process group (if any)."""
    if active():
        dist.destroy_process_group()


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's items: every ``world``-th from ``rank`` on (sizes differ by at most one)."""
    return list(items[rank::world])


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if active():
        dist.barrier()


def broadcast_outcome(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and hand its result — or its :class:`EnsdivError`, raised on
    every rank — to all ranks (one collective), so no rank waits on one that failed."""
    if not active():
        return fn()
    result: T | None = None
    error = None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except EnsdivError as e:
            error = str(e)
    result, error = gather_objects((result, error))[0]
    if error is not None:
        raise EnsdivError(error)
    return result  # type: ignore[return-value]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place and return it (no-op without a process group)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_gradients(params: Iterable[torch.nn.Parameter], weight: float) -> int:
    """Replace every gradient by Σ_ranks ``weight``·grad, in one coalesced all-reduce.

    With ``weight`` = (this rank's samples) / (the global batch's samples) and per-rank mean
    losses, the result is the gradient of the global batch's mean loss. Parameters without a
    gradient count as zero on every rank. Returns the bytes all-reduced (the step's volume).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        return 0
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]) * weight
    all_reduce_sum(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n
    return flat.numel() * flat.element_size()


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not active():
        return [obj]
    out: list[T] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(out, obj)
    return out
