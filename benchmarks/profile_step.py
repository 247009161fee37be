"""Where a GAL training step spends its time: torch.profiler, before and after ensdiv.layers.

    python benchmarks/profile_step.py [--arch resnet20] [--out benchmarks/results/profile-cpu.json]

Profiles ``steps`` GAL steps (λ = 0.5, Adam, M = 3; cnn 1×28×28 at batch 128 by default,
resnet20 3×32×32 at batch 32) of three models: built from ``torch.nn`` layers (before), from
``ensdiv.layers`` (after), and with the compiled GroupNorm kernel (after, ``--compile``); and a
plain step for scale. ``--vs-nf`` adds the normalization-free twin's GAL and plain steps
(``cnn-nf``, ``resnet20-fixup``). Writes the self-CPU time of
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

ELEMENTWISE = ("elementwise mul / add / sub / sum / fill (GroupNorm's double backward; "
               "Fixup's scalars)")
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
NF = {"cnn": "cnn-nf", "resnet20": "resnet20-fixup"}
SHAPES = {"cnn": ((1, 28, 28), 128), "resnet20": ((3, 32, 32), 32)}


def nf_variants(arch: str) -> list[tuple[str, str, bool, str]]:
    """The normalization-free twin's GAL and plain step, as profile variants."""
    return [(f"{NF[arch]}: GAL", "gal", False, NF[arch]),
            (f"{NF[arch]}: plain step", "plain", False, NF[arch])]


def profile_variant(method: str, compiled: bool, steps: int, arch: str = "cnn",
                    shape: tuple[int, ...] = (1, 28, 28), batch: int = 128) -> dict[str, float]:
    """Self-CPU milliseconds per step, by operator group."""
    layers.use_compiled_kernels(compiled)
    try:
        step = method_step(method, "cpu", arch, shape, 3, batch)
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
    names = list(data["profiles"])
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
    ap.add_argument("--arch", choices=sorted(SHAPES), default="cnn")
    ap.add_argument("--batch", type=int, default=None, help="default: cnn 128, resnet20 32")
    ap.add_argument("--vs-nf", action="store_true",
                    help="add the normalization-free twin's GAL and plain steps")
    args = ap.parse_args(argv)
    shape, batch = SHAPES[args.arch][0], args.batch or SHAPES[args.arch][1]
    variants = [(*v, args.arch) for v in VARIANTS] + (nf_variants(args.arch) if args.vs_nf else [])
    size = "x".join(map(str, shape))
    data = {"machine": {**machine("cpu"), "device_name": device_name("cpu")},
            "model": f"{args.arch} {size}, M=3, batch {batch}, lambda 0.5, Adam",
            "steps": args.steps,
            "profiles": {name: profile_variant(method, compiled, args.steps, arch, shape, batch)
                         for name, method, compiled, arch in variants}}
    if args.out:
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    sys.exit(main())
