"""How many noise samples staged certification saves, on simulated base classifiers.

A base classifier whose top class has a known probability p under noise (class 0 when the noise
on its one pixel falls below σ·Φ⁻¹(p)) has the exact smoothed radius R = σ·Φ⁻¹(p). For true radii
R on a grid (uniform in [0, 2.5], σ = 0.5) and each asked radius r, it compares Cohen's CERTIFY
at n = 100,000 (certified at r when its radius ≥ r; 100,100 samples) with
``Smooth.certify_radius`` (stages 1,000 / 10,000 / 100,000, β = 1e-4): the share certified
and the mean number of samples, over ``REPS`` seeds per grid point, α = 0.001.

    python benchmarks/staged_sampling.py

``--real CERTIFY_DIR STAGED_DIR...`` prints the same comparison for real runs instead: a plain
``ensdiv certify`` run (records in CERTIFY_DIR) and ``ensdiv certify --radius r`` runs of the
same model on the same images (one folder per r), all read from their records.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
from scipy.stats import norm
from torch import nn

from ensdiv.smoothing import ABSTAIN, Smooth

SIGMA, ALPHA, N, REPS = 0.5, 0.001, 100_000, 10
GRID = [0.05 + 0.1 * i for i in range(25)]  # true radii 0.05 .. 2.45
ASKED = (0.25, 0.5, 0.75, 1.0)


class KnownP(nn.Module):
    """Class 0 with probability p under N(0, σ²) noise on pixel 0 (input 0.5)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.cut = 0.5 + SIGMA * float(norm.ppf(p))
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = (x.flatten(1)[:, 0] < self.cut).float()
        return torch.stack([top, 1 - top], 1)


def main() -> None:
    x = torch.full((1, 1, 1), 0.5)
    print(f"σ = {SIGMA}, α = {ALPHA}, plain CERTIFY at n = {N:,}; staged: 1,000 / 10,000 / "
          f"100,000 with β = 1e-4; true radii {GRID[0]:.2f}..{GRID[-1]:.2f} in steps of 0.1, "
          f"{REPS} seeds each.\n")
    print("| asked r | certified, CERTIFY | certified, staged | mean samples, staged "
          "| samples saved (×) |")
    print("|---|---|---|---|---|")
    for r in ASKED:
        plain_hits = staged_hits = 0
        used = []
        for i, radius in enumerate(GRID):
            p = float(norm.cdf(radius / SIGMA))
            for rep in range(REPS):
                seed = 1_000 * i + rep
                sm = Smooth(KnownP(p), num_classes=2, sigma=SIGMA, seed=seed)
                cls, rad = sm.certify(x, n0=100, n=N, alpha=ALPHA, batch_size=N)
                plain_hits += cls == 0 and rad >= r
                sm = Smooth(KnownP(p), num_classes=2, sigma=SIGMA, seed=seed)
                cls, n_used = sm.certify_radius(x, r, alpha=ALPHA, batch_size=N)
                staged_hits += cls == 0
                used.append(n_used)
        total = len(GRID) * REPS
        mean_used = statistics.fmean(used)
        print(f"| {r} | {plain_hits / total:.3f} | {staged_hits / total:.3f} | "
              f"{mean_used:,.0f} | {(N + 100) / mean_used:.1f} |")
    assert ABSTAIN == -1


def _records(folder: str) -> tuple[dict, list[dict]]:
    cfg = json.loads((Path(folder) / "certify.json").read_text())
    recs = [json.loads(line) for line in (Path(folder) / "records.jsonl").read_text().splitlines()]
    return cfg, recs


def real(certify_dir: str, staged_dirs: list[str]) -> None:
    """The CERTIFY-vs-staged table from the records of real runs."""
    cfg, plain = _records(certify_dir)
    by_idx = {r["idx"]: r for r in plain}
    stages = _records(staged_dirs[0])[0]["stages"]
    print(f"σ = {cfg['sigma']}, α = {cfg['alpha']}, plain CERTIFY at n = {cfg['n']:,} "
          f"(n0 = {cfg['n0']}) on {len(plain)} test images of {cfg['dataset']} "
          f"({cfg['ensemble']}, weights {cfg['weights']}); staged: "
          f"{' / '.join(f'{s:,}' for s in stages)}"
          " with β = 1e-4, the same images.\n")
    print("| asked r | certified, CERTIFY | certified, staged | mean samples, staged "
          "| samples saved (×) | most samples, staged |")
    print("|---|---|---|---|---|---|")
    all_used, all_plain, all_staged, all_n = [], 0, 0, 0
    for folder in staged_dirs:
        scfg, staged = _records(folder)
        if scfg["weights"] != cfg["weights"] or scfg["sigma"] != cfg["sigma"]:
            raise SystemExit(f"{folder} certified another model or sigma than {certify_dir}")
        r = scfg["radius"]
        same = [by_idx[s["idx"]] for s in staged if s["idx"] in by_idx]
        plain_hits = sum(1 for p in same if p["correct"] and p["radius"] >= r)
        staged_hits = sum(1 for s in staged if s["correct"] and s["idx"] in by_idx)
        mean_used = statistics.fmean(s["samples"] for s in staged)
        all_used += [s["samples"] for s in staged]
        all_plain, all_staged, all_n = all_plain + plain_hits, all_staged + staged_hits, \
            all_n + len(same)
        print(f"| {r:g} | {plain_hits / len(same):.3f} | {staged_hits / len(same):.3f} | "
              f"{mean_used:,.0f} | {(cfg['n'] + cfg['n0']) / mean_used:.1f} | "
              f"{max(s['samples'] for s in staged):,} |")
    if len(staged_dirs) > 1:
        mean_used = statistics.fmean(all_used)
        print(f"| all {len(staged_dirs)} together | {all_plain / all_n:.3f} | "
              f"{all_staged / all_n:.3f} | {mean_used:,.0f} | "
              f"{(cfg['n'] + cfg['n0']) / mean_used:.1f} | {max(all_used):,} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--real":
        real(sys.argv[2], sys.argv[3:])
    else:
        main()
