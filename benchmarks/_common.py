"""What every benchmark shares: devices, the machine's description, paired timing, and the
training-step factory (one place for the ensemble, optimizer, batch and step closure).

Every benchmark records in ``extra_info``: ``device``, ``device_name``, ``torch``, ``threads``,
its shapes (``m``, ``batch``, ``arch`` …) and its derived figure (a ratio, a rate, GFLOP/s
against the machine's measured matmul ceiling). ``benchmarks/report.py`` turns a saved JSON file
into the README's tables from those fields only.

Sizes: ``ENSDIV_BENCH_SMOKE=1`` (what CI sets) shrinks every benchmark to a tiny case so the
suite runs in seconds and never rots; numbers from it mean nothing.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch import nn

from ensdiv.diversity import gal_loss
from ensdiv.ensemble import Ensemble

K = TypeVar("K", bound=Hashable)

SMOKE = os.environ.get("ENSDIV_BENCH_SMOKE", "") not in ("", "0")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's model (from /proc/cpuinfo where there is one)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: str) -> None:
    """Wait for queued GPU work so wall time measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@functools.cache
def matmul_gflops(device: str = "cpu", size: int = 1024, reps: int = 5) -> float:
    """The ceiling: the best of ``reps`` float32 ``size``×``size`` matmuls, in GFLOP/s."""
    size = 256 if SMOKE else size
    a = torch.rand(size, size, device=device)
    best = float("inf")
    for _ in range(reps + 1):
        sync(device)
        t = time.perf_counter()
        a @ a
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9


def machine(device: str) -> dict[str, object]:
    """The fields every benchmark's ``extra_info`` starts with."""
    return {"device": device, "device_name": device_name(device), "torch": torch.__version__,
            "threads": torch.get_num_threads()}


def native_layers(module: nn.Module) -> nn.Module:
    """``module`` with ensdiv's double-backprop layers swapped for ``torch.nn``'s (in place, same
    weights): the model as a user writes it in plain PyTorch."""
    from ensdiv import layers

    swaps = {layers.GroupNorm: lambda m: nn.GroupNorm(m.num_groups, m.num_channels, m.eps),
             layers.Conv2d: lambda m: nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size,
                                                m.stride, m.padding, m.dilation, m.groups,
                                                m.bias is not None),
             layers.ReLU: lambda m: nn.ReLU(),
             layers.MaxPool2d: lambda m: nn.MaxPool2d(m.kernel_size, m.stride, m.padding,
                                                      m.dilation, ceil_mode=m.ceil_mode)}
    for name, child in module.named_children():
        make = swaps.get(type(child))
        if make is None:
            native_layers(child)
            continue
        new = make(child)
        new.load_state_dict(child.state_dict())
        setattr(module, name, new.to(next(child.parameters(), torch.empty(0)).device))
    return module


def autograd_gal_loss(ens: Ensemble, x: torch.Tensor, y: torch.Tensor,
                      lam: float = 0.5) -> torch.Tensor:
    """GAL written with ``torch.autograd.grad(create_graph=True)``, one member at a time: the
    reference a user writes in plain PyTorch."""
    ces, grads = [], []
    for member in ens.members:
        xx = x.clone().requires_grad_(True)
        ce = nn.functional.cross_entropy(member(xx), y, reduction="sum")
        (g,) = torch.autograd.grad(ce, xx, create_graph=True)
        ces.append(ce / len(y))
        grads.append(g)
    return sum(ces) + lam * gal_loss(torch.stack(grads))


def batch(shape: tuple[int, ...], size: int, device: str,
          classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch (inputs in [0, 1], labels)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(size, *shape, generator=g).to(device)
    y = torch.randint(0, classes, (size,), generator=g).to(device)
    return x, y


def make_ensemble(arch: str, m: int, shape: tuple[int, ...], device: str, *,
                  path: str = "auto", native: bool = False) -> Ensemble:
    """A seeded ensemble; ``native=True`` builds it from plain ``torch.nn`` layers."""
    torch.manual_seed(0)
    ens = Ensemble.build(arch, m, in_shape=shape, num_classes=10, path=path)
    if native:
        for member in ens.members:
            native_layers(member)
        ens.refresh_skeleton()
    return ens.to(device)


def make_step(ens: Ensemble, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor,
              device: str, extra_params: list[nn.Parameter] | None = None) -> Callable[[], None]:
    """One optimizer step (zero_grad, loss, backward, Adam) of ``loss_fn(ens, x, y)`` as a
    closure; ``loss_fn`` returns a scalar or ``(scalar, stats)``."""
    opt = torch.optim.Adam(list(ens.parameters()) + list(extra_params or []), lr=1e-3)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = loss_fn(ens, x, y)
        (out[0] if isinstance(out, tuple) else out).backward()
        opt.step()
        sync(device)

    return step


def paired_rounds(benchmark, target: Callable[[], None], base: Callable[[], None], device: str,
                  rounds: int = 5) -> float:
    """pytest-benchmark times ``target``; each round's setup runs ``base`` (timed here, not by
    pytest-benchmark). Returns the median of the per-round ratios target / base."""
    base_times: list[float] = []
    target_times: list[float] = []

    def setup() -> None:
        sync(device)
        t = time.perf_counter()
        base()
        sync(device)
        base_times.append(time.perf_counter() - t)

    def timed() -> None:
        t = time.perf_counter()
        target()
        sync(device)
        target_times.append(time.perf_counter() - t)

    rounds = 1 if SMOKE else rounds
    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=0 if SMOKE else 1)
    if not target_times or not base_times:  # --benchmark-disable runs the target once, bare
        setup()
        timed()
    n = min(len(base_times), len(target_times), rounds)
    pairs = list(zip(target_times[-n:], base_times[-n:], strict=True))
    benchmark.extra_info["base_median_s"] = statistics.median(b for _, b in pairs)
    return statistics.median(a / b for a, b in pairs)


def paired_times(fns: dict[K, Callable[[], None]], device: str,
                 reps: int = 5) -> dict[K, list[float]]:
    """Seconds of each closure in each of ``reps`` repetitions, all closures timed back to back
    in every repetition (the machine's drift hits them alike; ratios are taken per
    repetition). The first repetition only warms up."""
    times: dict[K, list[float]] = {k: [] for k in fns}
    for rep in range(reps + 1):
        for key, fn in fns.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if rep:
                times[key].append(time.perf_counter() - t)
    return times


def paired_median(times: list[float], base: list[float], scale: float = 1.0) -> float:
    """Median over repetitions of ``times[i] / (scale · base[i])``."""
    return statistics.median(a / (scale * b) for a, b in zip(times, base, strict=True))


def step_record(steps: dict[str, Callable[[], None]], reps: int, *, arch: str, m: int,
                batch: int, shape: tuple[int, ...]) -> dict:
    """CPU training steps timed back to back in each repetition (:func:`paired_times`), with
    the machine and the case: the JSON a paired step table is made from."""
    import datetime

    times = paired_times(steps, "cpu", reps)
    return {**machine("cpu"), "arch": arch, "m": m, "batch": batch, "shape": list(shape),
            "reps": reps, "date": datetime.date.today().isoformat(), "seconds": times}


def step_table(data: dict, label: str) -> str:
    """Median step time and median per-repetition ratio to the ``plain`` step, one row per
    step of a :func:`step_record` (``label`` names the first column)."""
    t = data["seconds"]
    lines = [f"{data['arch']}, M = {data['m']}, batch {data['batch']}, "
             f"{data['shape'][1]}×{data['shape'][2]}, {data['device_name']}, torch "
             f"{data['torch']}, {data['threads']} threads; median of {data['reps']} paired "
             f"repetitions ({data['date']})", "",
             f"| {label} | step (ms) | step / plain step |", "|---|---|---|"]
    lines += [f"| {name} | {statistics.median(t[name]) * 1000:.0f} | "
              f"{paired_median(t[name], t['plain']):.2f} |" for name in t]
    return "\n".join(lines)


def step_main(argv: list[str], run: Callable[[int], dict], description: str) -> None:
    """The command line of a paired step benchmark: ``--reps N --out FILE.json``; prints the
    :func:`step_table`-style table of what ``run(reps)`` measured (``run``'s module's
    ``table``)."""
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="write the JSON here (benchmarks/results/…)")
    args = parser.parse_args(argv)
    data = run(args.reps)
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(sys.modules[run.__module__].table(data))
