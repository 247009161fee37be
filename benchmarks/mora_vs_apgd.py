"""MORA against APGD-CE at the same number of iterations, on a trained ensemble (issue 21).

Every attack runs on the first ``--n`` test images the ensemble classifies correctly under the
rule; success is counted over those. Iterations are gradient steps per input: APGD-CE R×T is R
restarts of T steps, MORA S×T is T steps for each of S mixing weights (a restart or mixing
weight runs only on the inputs still unbroken, so both spend at most R·T or S·T per input).

    python benchmarks/mora_vs_apgd.py runs/cards/mnist5k-gal3-s0 \\
        --out results/mora-vs-apgd/mnist5k-gal3.json
    python benchmarks/mora_vs_apgd.py --table results/mora-vs-apgd/mnist5k-gal3.json

The record states n, eps, the rule, every attack's setup, seed and wall time; :func:`table`
renders it (the docs' block is its output, checked by tests/test_readme.py).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ensdiv.aggregation import Aggregated
from ensdiv.attacks import MORA_MIX, apgd, mora
from ensdiv.ensemble import weights_fingerprint
from ensdiv.io import atomic_write_json, read_json, utc_now
from ensdiv.runs.rundir import load_run
from ensdiv.transferability import success_counts

#: (label, attack, iterations per input, keyword arguments)
VARIANTS: tuple[tuple[str, str, int, dict[str, Any]], ...] = (
    ("APGD-CE 1×100", "apgd", 100, {"steps": 100, "restarts": 1}),
    ("APGD-CE 5×20", "apgd", 100, {"steps": 20, "restarts": 5}),
    ("MORA s=0.5 1×100", "mora", 100, {"steps": 100, "mix": (0.5,)}),
    ("MORA 5×20", "mora", 100, {"steps": 20, "mix": MORA_MIX}),
    ("APGD-CE 5×100", "apgd", 500, {"steps": 100, "restarts": 5}),
    ("MORA 5×100", "mora", 500, {"steps": 100, "mix": MORA_MIX}),
)


def measure(run: str, *, n: int, eps: list[float], rules: list[str], seed: int,
            log: Any = print) -> dict[str, Any]:
    loaded = load_run(run)
    ens = loaded.ensemble
    test = loaded.test
    x = torch.stack([test[i][0] for i in range(n)])
    y = torch.tensor([int(test[i][1]) for i in range(n)])
    rows = []
    for e in eps:
        for rule in rules:
            model = Aggregated(ens, rule)
            for label, kind, iters, kw in VARIANTS:
                t0 = time.perf_counter()
                if kind == "apgd":
                    adv = apgd(model, x, y, eps=e, loss="ce", seed=seed, **kw)
                else:
                    adv = mora(ens, x, y, eps=e, aggregation=rule, seed=seed, **kw)
                s = success_counts(model, x, y, adv)
                rows.append({"eps": e, "aggregation": rule, "attack": label,
                             "iterations": iters, **s.to_dict(),
                             "setup": {k: list(v) if isinstance(v, tuple) else v
                                       for k, v in kw.items()},
                             "seconds": time.perf_counter() - t0})
                log(f"eps {e:g} {rule:<8} {label:<18} {s.rate:.3f} ({s.fooled}/{s.total}) "
                    f"{rows[-1]['seconds']:.0f}s")
    return {"run": run, "dataset": loaded.dataset, "weights": weights_fingerprint(ens),
            "members": ens.num_members, "arch": ens.config.get("arch"),
            "training": {k: ens.config.get(k) for k in ("diversity", "lam", "epochs", "seed")},
            "n": n, "seed": seed, "keep": "first success per input (apgd, mora)",
            "threads": torch.get_num_threads(), "machine": platform.processor() or
            platform.machine(), "time": utc_now(), "rows": rows}


def table(record: dict[str, Any]) -> str:
    """Success over the inputs correct under the rule (± binomial s.e.), one column per rule.

    Example:
        >>> rec = {"rows": [{"eps": 0.1, "aggregation": "softmax", "attack": "A",
        ...                  "iterations": 100, "rate": 0.5, "fooled": 50, "total": 100}]}
        >>> print(table(rec).splitlines()[-1])
        | 0.1 | A | 100 | 0.500 ± 0.050 |
    """
    rules = list(dict.fromkeys(r["aggregation"] for r in record["rows"]))
    lines = ["| ε | attack | iterations | " + " | ".join(f"success ({r})" for r in rules)
             + " |", "|---" * (3 + len(rules)) + "|"]
    keys = list(dict.fromkeys((r["eps"], r["attack"], r["iterations"])
                              for r in record["rows"]))
    by = {(r["eps"], r["attack"], r["aggregation"]): r for r in record["rows"]}
    for e, attack, iters in keys:
        cells = []
        for rule in rules:
            r = by[(e, attack, rule)]
            se = math.sqrt(r["rate"] * (1 - r["rate"]) / r["total"]) if r["total"] else math.nan
            cells.append(f"{r['rate']:.3f} ± {se:.3f}")
        lines.append(f"| {e:g} | {attack} | {iters} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?")
    p.add_argument("--out")
    p.add_argument("--table")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--eps", default="0.1")
    p.add_argument("--rules", default="softmax,vote")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.table:
        print(table(read_json(a.table)))
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    rec = measure(a.run, n=a.n, eps=[float(v) for v in a.eps.split(",")],
                  rules=a.rules.split(","), seed=a.seed)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(a.out, rec)
    print(table(rec))
    print(json.dumps({"n": rec["n"], "weights": rec["weights"]}))


if __name__ == "__main__":
    main()
