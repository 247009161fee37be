"""The README's performance tables from a pytest-benchmark JSON file (``make bench`` writes
``.benchmarks/latest.json``; committed runs live in ``benchmarks/results/``).

    python benchmarks/report.py FILE.json [FILE.json ...]

Every number comes from the file: times are pytest-benchmark medians, ratios the medians of
per-round paired ratios recorded in ``extra_info`` (see ``benchmarks/_common.py``). Several files
(say a CPU and a GPU run) are reported one after the other.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

STEP_METHODS = ["cos", "gal", "gdr", "drt", "gal-stacked", "gal-compiled", "gal-torch.nn",
                "plain-torch.nn", "gal-autograd"]


def _rows(data: dict, bench: str) -> list[dict]:
    out = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if info.get("bench") == bench:
            out.append({**info, "median": b["stats"]["median"]})
    return out


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.2f} ms"


def _shape(r: dict) -> str:
    return "×".join(str(s) for s in r["shape"][1:])


def machine_line(data: dict) -> str:
    """Where and when: device, torch, threads, date (from the file's own records)."""
    first = data["benchmarks"][0]["extra_info"] if data["benchmarks"] else {}
    devices = sorted({b["extra_info"].get("device_name", "?") for b in data["benchmarks"]})
    return (f"Run of {data.get('datetime', '?')[:10]} on {', '.join(devices)}; torch "
            f"{first.get('torch', '?')}, {first.get('threads', '?')} threads. Times: medians of "
            f"the rounds; ratios: medians of per-round paired ratios.")


def step_table(data: dict) -> str:
    """Training step with each regularizer, as a multiple of the plain step."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in _rows(data, "step"):
        groups[(r["device_name"], r["arch"], _shape(r), r["m"], r["batch"])][r["method"]] = r
    header = ["device", "model", "M", "batch", "plain step"] + [f"{m} / plain"
                                                                 for m in STEP_METHODS]
    rows = []
    for (dev, arch, shape, m, size), t in sorted(groups.items()):
        plain = t.get("plain")
        base = plain["median"] if plain else next(iter(t.values()))["base_median_s"]
        cells = [f"{t[k]['ratio_to_plain']:.2f}" if k in t else "–" for k in STEP_METHODS]
        rows.append([dev, f"{arch} {shape}", str(m), str(size), _ms(base)] + cells)
    return _table(header, rows)


def step_headline(data: dict, arch: str = "cnn", m: int = 3, size: int = 128) -> str:
    """The issue's headline: GAL / plain for one case, with and without the compiled kernel."""
    t = {r["method"]: r["ratio_to_plain"] for r in _rows(data, "step")
         if r["arch"] == arch and r["m"] == m and r["batch"] == size and r["device"] == "cpu"}
    if "gal" not in t:
        return ""
    parts = [f"**{t['gal']:.2f}** with ensdiv.layers"]
    if "gal-compiled" in t:
        parts.append(f"**{t['gal-compiled']:.2f}** with `--compile`")
    if "gal-torch.nn" in t:
        parts.append(f"{t['gal-torch.nn']:.2f} with torch.nn layers")
    if "gal-autograd" in t:
        parts.append(f"{t['gal-autograd']:.2f} for the `autograd.grad` loop on torch.nn layers")
    return (f"GAL step / plain step, {arch}, M = {m}, batch {size}, CPU: " + ", ".join(parts)
            + " (target: ≤ 2.3; floor ≈ 2.0).")


def gradients_table(data: dict) -> str:
    """Input gradients alone: the stacked and loop paths against the autograd loop."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in _rows(data, "input_gradients"):
        groups[(r["device_name"], r["arch"], _shape(r), r["m"], r["batch"])][r["path"]] = r
    rows = []
    for (dev, arch, shape, m, size), t in sorted(groups.items()):
        ref = t.get("autograd")
        rows.append([dev, f"{arch} {shape}", str(m), str(size),
                     _ms(ref["median"]) if ref else "–"]
                    + [f"{t[p]['ratio_to_autograd']:.2f}" if p in t else "–"
                       for p in ("loop", "stacked")])
    return _table(["device", "model", "M", "batch", "autograd.grad loop", "torch.func loop / it",
                   "stacked vmap / it"], rows)


def orthant_table(data: dict) -> str:
    """orthant_probability: time for the batch of matrices and max error per M."""
    rows = []
    for r in sorted(_rows(data, "orthant"), key=lambda r: (r["m"], -r["n_points"])):
        rows.append([str(r["m"]), f"{r['n_points']:,}" if r["n_points"] else "closed form",
                     f"{r['median']:.3f} s", f"{r['max_error']:.1e}",
                     f"{r['mean_probability']:.3f}"])
    return _table(["M", "points", f"time ({_rows(data, 'orthant')[0]['matrices']:,} matrices)"
                   if _rows(data, "orthant") else "time", "max error", "mean GDR"], rows)


def _gflops(r: dict) -> str:
    return f"{r['gflops']:.1f} ({r['gflops'] / r['ceiling_gflops']:.0%})"


def attack_table(data: dict) -> str:
    """Attack iterations per second on the ensemble."""
    rows = [[r["device_name"], f"{r['arch']} {_shape(r)}", str(r["m"]), str(r["batch"]),
             r["attack"], f"{r['steps_per_s']:.2f}", f"{r['sample_steps_per_s']:,.0f}",
             _gflops(r)]
            for r in sorted(_rows(data, "attack"),
                            key=lambda r: (r["device_name"], r["arch"], r["m"], r["attack"]))]
    return _table(["device", "model", "M", "batch", "attack", "iterations/s",
                   "sample-iterations/s", "GFLOP/s (of ceiling)"], rows)


def certify_table(data: dict) -> str:
    """Noisy samples per second through Smooth, and the ensemble's cost per member."""
    rows_in = _rows(data, "certify")
    member = {(r["device_name"], r["arch"], r["channels_last"]): r["median"]
              for r in rows_in if r["m"] == 1}
    rows = []
    for r in sorted(rows_in, key=lambda r: (r["device_name"], r["arch"], not r["channels_last"],
                                            r["m"])):
        one = member.get((r["device_name"], r["arch"], r["channels_last"]))
        per = f"{r['median'] / (r['m'] * one):.2f}" if one else "–"
        rows.append([r["device_name"], f"{r['arch']} {_shape(r)}", str(r["m"]),
                     "channels_last" if r["channels_last"] else "NCHW", f"{r['batch']:,}",
                     f"{r['samples_per_s']:,.0f}", _gflops(r), per])
    return _table(["device", "model", "M", "weights", "batch", "samples/s",
                   "GFLOP/s (of ceiling)", "time / (M × member's)"], rows)


def detect_table(data: dict) -> str:
    """Inputs scored per second."""
    rows = [[r["device_name"], f"{r['arch']} {_shape(r)}", str(r["m"]), r["score"],
             f"{r['inputs_per_s']:,.0f}"]
            for r in sorted(_rows(data, "detect"),
                            key=lambda r: (r["device_name"], r["arch"], r["m"], r["score"]))]
    return _table(["device", "model", "M", "score", "inputs/s"], rows)


def ensemble_table(data: dict) -> str:
    """Stacked vmap vs loop, forward + backward of summed CE."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in _rows(data, "ensemble"):
        groups[(r["device_name"], r["arch"], _shape(r), r["m"], r["batch"])][r["path"]] = r
    rows = [[dev, f"{arch} {shape}", str(m), str(size),
             _ms(t["loop"]["median"]) if "loop" in t else "–",
             f"{t['stacked']['ratio_to_loop']:.2f}" if "stacked" in t else "–"]
            for (dev, arch, shape, m, size), t in sorted(groups.items())]
    return _table(["device", "model", "M", "batch", "loop", "stacked / loop"], rows)


def objective_table(data: dict) -> str:
    """Robust objectives' steps (bench_transfer) against the plain step."""
    rows_in = _rows(data, "objective")
    rows = [[r["objective"], _ms(r["median"]), f"{r['ratio_to_plain']:.2f}"] for r in rows_in]
    what = (f"objective ({rows_in[0]['arch']} {_shape(rows_in[0])}, M = {rows_in[0]['m']}, "
            f"batch {rows_in[0]['batch']})" if rows_in else "objective")
    return _table([what, "step", "step / plain step"], rows)


SECTIONS: list[tuple[str, Callable[[dict], str], str]] = [
    ("step", step_table, "Training step with a diversity regularizer (λ = 0.5, Adam)"),
    ("input_gradients", gradients_table, "Input gradients of every member"),
    ("orthant", orthant_table, "GDR: orthant probabilities"),
    ("attack", attack_table, "Attacks on the ensemble"),
    ("certify", certify_table, "Certification: noisy samples through Smooth"),
    ("detect", detect_table, "Detection scoring"),
    ("ensemble", ensemble_table, "Ensemble execution path"),
    ("objective", objective_table, "Robust objectives"),
]


def report(data: dict) -> str:
    """All sections present in ``data``, each a bold title and a table."""
    parts = [machine_line(data)]
    for bench, fn, title in SECTIONS:
        if _rows(data, bench):
            parts.append(f"**{title}**\n\n{fn(data)}")
            if bench == "step" and step_headline(data):
                parts.append(step_headline(data))
    return "\n\n".join(parts) + "\n"


def main(paths: list[str]) -> None:
    for path in paths:
        print(report(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main(sys.argv[1:])
