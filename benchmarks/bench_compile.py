"""What ``--compile`` costs and when it pays: the compile time of the fused GroupNorm double
backward (``ensdiv.layers.use_compiled_kernels``) and the GAL steps it takes to earn it back.

    python benchmarks/bench_compile.py --reps 7 --out benchmarks/results/compile-cpu-DATE.json

Per case (cnn 1×28×28 at batch 32 and 128, resnet20 3×32×32 at batch 32; M = 3, λ = 0.5,
Adam): the first compiled GAL step with an empty inductor cache (compiling every GroupNorm
activation shape of the step), then ``reps`` paired eager/compiled steps. Break-even: the
compile time over the median paired saving per step. A run meets one more shape for its last,
smaller batch (another compile), and the cache on disk spares a second run the compile.
Each case runs in a fresh process with an empty inductor cache: the compile time a first run pays
(in one process a second case reuses the first one's warm compiler). A script, not a
pytest-benchmark (the benchmark smoke in CI must not compile).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ensdiv import layers

from _common import device_name, machine
from bench_diversity import method_step

CASES = [("cnn", (1, 28, 28), 32), ("cnn", (1, 28, 28), 128), ("resnet20", (3, 32, 32), 32)]


def measure(arch: str, shape: tuple[int, ...], size: int, reps: int) -> dict:
    """First compiled step, median eager and compiled steps and the paired saving (seconds)."""
    eager = method_step("gal", "cpu", arch, shape, 3, size)
    compiled = method_step("gal", "cpu", arch, shape, 3, size)
    for _ in range(2):
        eager()
    layers.use_compiled_kernels(True)
    try:
        t = time.perf_counter()
        compiled()
        first = time.perf_counter() - t
        compiled()
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for _ in range(reps):
            for name, step in (("eager", eager), ("compiled", compiled)):
                layers.use_compiled_kernels(name == "compiled")
                t = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t)
    finally:
        layers.use_compiled_kernels(False)
    saving = statistics.median(e - c for e, c in zip(times["eager"], times["compiled"],
                                                       strict=True))
    return {"arch": arch, "shape": list(shape), "batch": size, "first_step_s": first,
            "eager_s": statistics.median(times["eager"]),
            "compiled_s": statistics.median(times["compiled"]), "saving_s": saving,
            "times": times}


def break_even(case: dict) -> float:
    """Steps after which the compile time is repaid (inf if compiling does not save)."""
    compile_s = case["first_step_s"] - case["compiled_s"]
    return compile_s / case["saving_s"] if case["saving_s"] > 0 else float("inf")


def table(data: dict) -> str:
    """The docs' table from a JSON of :func:`main`."""
    m = data["machine"]
    lines = [f"{m['device_name']}, torch {m['torch']}, {m['threads']} threads; GAL, M = 3; "
             f"median of {data['reps']} paired steps ({data['date']})", "",
             "| members, batch | compile (s) | eager step (ms) | compiled step (ms) | "
             "saving per step (ms) | break-even (steps) |",
             "|---|---|---|---|---|---|"]
    for c in data["cases"]:
        lines.append(f"| {c['arch']}, {c['batch']} | {c['first_step_s'] - c['compiled_s']:.1f} | "
                     f"{1000 * c['eager_s']:.0f} | {1000 * c['compiled_s']:.0f} | "
                     f"{1000 * c['saving_s']:.0f} | {break_even(c):,.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case is not None:  # one case, in this (fresh) process: its JSON on stdout
        print(json.dumps(measure(*CASES[args.case], args.reps)))
        return
    cases = []
    for i in range(len(CASES)):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="ensdiv-ind-")}
        out = subprocess.run([sys.executable, __file__, "--case", str(i), "--reps",
                              str(args.reps)], env=env, check=True, capture_output=True,
                             text=True).stdout
        cases.append(json.loads(out.strip().splitlines()[-1]))
    data = {"machine": {**machine("cpu"), "device_name": device_name("cpu")}, "reps": args.reps,
            "date": time.strftime("%Y-%m-%d"), "cases": cases}
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    sys.exit(main())
