"""Where a GAL training step spends its time: torch.profiler, before and after ensdiv.layers.

    python benchmarks/profile_step.py [--out benchmarks/results/profile-cpu.json]

Profiles ``steps`` GAL steps (λ = 0.5, Adam; cnn 28×28, M = 3, batch 128) of three models:
built from ``torch.nn`` layers (before), from ``ensdiv.layers`` (after), and with the compiled
GroupNorm kernel (after, ``--compile``); and a plain step for scale. Writes the self-CPU time of
each operator per step (ms) to JSON and prints the README's table from it: the operators that
cost the most in any variant, grouped where one idea covers several kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

from ensdiv import layers

from _common import device_name, machine
from bench_diversity import method_step

ELEMENTWISE = "elementwise mul / add / sub / sum / fill (mostly GroupNorm's double backward)"
GROUPS = {
    "aten::mkldnn_convolution": "convolution (forward, and inside double backward)",
    "aten::convolution": "convolution (forward, and inside double backward)",
    "aten::convolution_backward": "convolution backward",
    "aten::native_group_norm": "GroupNorm forward",
    "aten::native_group_norm_backward": "GroupNorm backward (native kernel)",
    "aten::mul": ELEMENTWISE,
    "aten::add": ELEMENTWISE,
    "aten::sub": ELEMENTWISE,
    "aten::sum": ELEMENTWISE,
    "aten::fill_": ELEMENTWISE,
    "aten::addcmul_": ELEMENTWISE,
    "aten::add_": ELEMENTWISE,
    "aten::div": ELEMENTWISE,
    "aten::max_pool2d_with_indices": "max pooling forward",
    "aten::max_pool2d_with_indices_backward": "max pooling backward",
    "aten::threshold_backward": "ReLU backward",
    "aten::clamp_min": "ReLU forward",
}
COMPILED = "fused GroupNorm double backward (torch.compile)"
VARIANTS = [("before: torch.nn layers", "gal-torch.nn", False),
            ("after: ensdiv.layers", "gal", False),
            ("after, --compile", "gal", True),
            ("plain step (ensdiv.layers)", "plain", False)]


def profile_variant(method: str, compiled: bool, steps: int) -> dict[str, float]:
    """Self-CPU milliseconds per step, by operator group."""
    layers.use_compiled_kernels(compiled)
    try:
        step = method_step(method, "cpu", "cnn", (1, 28, 28), 3, 128)
        for _ in range(3):  # warm up (and compile)
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
    finally:
        layers.use_compiled_kernels(False)
    out: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        key = COMPILED if "CompiledFxGraph" in e.key else GROUPS.get(e.key, "everything else")
        out[key] += e.self_cpu_time_total / 1000 / steps
    out["total"] = sum(v for k, v in out.items() if k != "total")
    return dict(out)


def table(data: dict) -> str:
    """The README's profile table from a profile JSON."""
    names = [v[0] for v in VARIANTS if v[0] in data["profiles"]]
    rows = {k for p in data["profiles"].values() for k in p if k != "total"}
    order = sorted(rows, key=lambda k: (k == "everything else",
                                        -max(p.get(k, 0.0) for p in data["profiles"].values())))
    lines = ["| operators (self CPU, ms per step) | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    for k in order + ["total"]:
        cells = [f"{data['profiles'][n].get(k, 0.0):.0f}" for n in names]
        label = f"**{k}**" if k == "total" else k
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the profile JSON here")
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    data = {"machine": {**machine("cpu"), "device_name": device_name("cpu")},
            "model": "cnn 28x28, M=3, batch 128, lambda 0.5, Adam", "steps": args.steps,
            "profiles": {name: profile_variant(method, compiled, args.steps)
                         for name, method, compiled in VARIANTS}}
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    sys.exit(main())
