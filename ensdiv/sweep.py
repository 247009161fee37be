"""The GDR-vs-attack-success experiment (after Adam & Speciel 2020, Fig. 3).

Trains one ensemble per (λ, seed) with a diversity regularizer, measures its GDR, and attacks it
(FGSM, L∞ PGD, MI-FGSM at several eps): white-box on the ensemble, transfer between its members,
and black-box from a held-out plain surrogate ensemble. One JSON record per ensemble goes to
``records.jsonl`` (rewritten atomically). The sweep is resumable: an ensemble with a record is
not retrained, an interrupted one resumes from its checkpoint.

Sanity warnings (printed and stored): many zero input gradients, L∞ PGD at eps = 1 not reaching
~100% success, and black-box success above white-box success — signs of gradient masking or a
broken evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ensdiv.attacks import ATTACKS, pgd
from ensdiv.data import load_dataset
from ensdiv.diversity import cosine_loss
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice
from ensdiv.gdr import gdr, summarize_gdr
from ensdiv.gradients import input_gradients
from ensdiv.io import atomic_write_jsonl, is_main_process, prepare_run_dir, read_jsonl
from ensdiv.train import TrainConfig, train_run
from ensdiv.transferability import success_counts, surrogate_transfer, transfer_matrix

RECORDS = "records.jsonl"
SWEEP_CONFIG = "sweep.json"
SURROGATE = "surrogate"
HUGE_EPS = 1.0
"""L∞ radius of the sanity attack: at eps = 1 every input can become any image."""


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Settings of a sweep; defaults fit 2 CPU cores in under 30 minutes on mnist5k."""

    dataset: str = "mnist5k"
    arch: str = "cnn"
    members: int = 3
    diversity: str = "gal"
    lams: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0)
    seeds: int = 3
    epochs: int = 3
    batch_size: int = 128
    lr: float = 3e-3
    noise_sigma: float = 0.0
    attacks: tuple[str, ...] = ("fgsm", "pgd", "mifgsm")
    eps: tuple[float, ...] = (0.03, 0.06, 0.09)
    steps: int = 10
    n_eval: int = 200
    eval_seed: int = 0
    surrogate_seed: int = 10_000

    def validate(self) -> SweepConfig:
        """Check every field; raise :class:`EnsdivError` with one clear message if bad."""
        self.train_config(self.lams[0] if self.lams else 0.0, 0).validate()
        if not self.lams:
            raise EnsdivError("--lams needs at least one value")
        if any(not lam >= 0 for lam in self.lams):
            raise EnsdivError(f"lams must be >= 0; got {list(self.lams)}")
        if self.seeds < 1:
            raise EnsdivError(f"seeds must be >= 1; got {self.seeds}")
        if self.members < 2:
            raise EnsdivError(f"a diversity sweep needs at least 2 members; got {self.members}")
        for a in self.attacks:
            check_choice("attack", a, tuple(ATTACKS))
        if not self.eps or any(not e >= 0 for e in self.eps):
            raise EnsdivError(f"eps values must be >= 0; got {list(self.eps)}")
        if self.steps < 1:
            raise EnsdivError(f"steps must be >= 1; got {self.steps}")
        if self.n_eval < 1:
            raise EnsdivError(f"n_eval must be >= 1; got {self.n_eval}")
        return self

    def train_config(self, lam: float, seed: int) -> TrainConfig:
        """The training run of one sweep point (λ = 0 trains plain: the term would be 0)."""
        return TrainConfig(dataset=self.dataset, arch=self.arch, members=self.members,
                           epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           seed=seed, diversity=self.diversity if lam > 0 else "none",
                           lam=lam if lam > 0 else 0.5, noise_sigma=self.noise_sigma)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def run_name(lam: float, seed: int) -> str:
    """Folder name of one sweep point."""
    return f"lam{lam:g}-seed{seed}"


def make_attack(name: str, eps: float, steps: int, seed: int) -> Callable[..., Tensor]:
    """``(model, x, y) -> x_adv`` for one attack at one eps (PGD seeded per call)."""
    fn = ATTACKS[name]
    if name == "fgsm":
        return functools.partial(fn, eps=eps)
    if name == "pgd":
        def run(model: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
            return pgd(model, x, y, eps=eps, steps=steps,
                       generator=torch.Generator().manual_seed(seed))
        return run
    return functools.partial(fn, eps=eps, steps=steps)


def sanity_warnings(zero_grad_fraction: float, huge_eps_success: float,
                    attacks: Sequence[dict[str, Any]]) -> list[str]:
    """The gradient-masking checks of the field (AutoAttack's habits) as messages."""
    out = []
    if zero_grad_fraction > 0.05:
        out.append(f"{zero_grad_fraction:.1%} of inputs have a zero input gradient for some "
                   "member (gradient masking?)")
    if not huge_eps_success >= 0.99:
        out.append(f"L∞ PGD at eps={HUGE_EPS} fooled only {huge_eps_success:.1%} of the "
                   "ensemble's correct inputs (should be ~100%: gradient masking or a bug)")
    for a in attacks:
        if a["blackbox"]["rate"] > a["whitebox"]["rate"]:
            out.append(f"black-box {a['attack']} at eps={a['eps']} beats white-box "
                       f"({a['blackbox']['rate']:.3f} > {a['whitebox']['rate']:.3f})")
    return out


def evaluate_point(ensemble: Ensemble, x: Tensor, y: Tensor, config: SweepConfig,
                   surrogate_adv: dict[tuple[str, float], Tensor],
                   surrogate: Ensemble) -> dict[str, Any]:
    """GDR, gradient cosine and every attack's success for one trained ensemble."""
    ensemble.eval()
    grads = input_gradients(ensemble, x, y)  # one pass serves GDR, cosine and the zero check
    res = summarize_gdr(gdr(grads))
    zero = float((grads.flatten(2).abs().amax(-1) == 0).any(0).float().mean())
    attacks = []
    for name in config.attacks:
        for eps in config.eps:
            tm = transfer_matrix(ensemble, x, y,
                                 attack=make_attack(name, eps, config.steps, config.eval_seed))
            black = surrogate_transfer(surrogate, ensemble, x, y,
                                       x_adv=surrogate_adv[(name, eps)])
            attacks.append({"attack": name, "eps": eps, "steps": 1 if name == "fgsm"
                            else config.steps, "whitebox": tm.whitebox.to_dict(),
                            "transfer_mean": tm.mean_transfer, "blackbox": black.to_dict(),
                            "transfer": tm.to_dict()})
    huge = success_counts(ensemble, x, y, make_attack("pgd", HUGE_EPS, config.steps,
                                                      config.eval_seed)(ensemble, x, y))
    last = attacks[-1]["transfer"]
    return {"member_acc": last["member_acc"], "ensemble_acc": last["ensemble_acc"],
            "gdr": res.mean, "gdr_sem": res.sem, "gdr_n": res.n_used,
            "gdr_excluded": res.n_excluded, "mean_cos": float(cosine_loss(grads)),
            "zero_grad_fraction": zero, "huge_eps_pgd": huge.to_dict(), "attacks": attacks,
            "warnings": sanity_warnings(zero, huge.rate, attacks)}


def run_sweep(config: SweepConfig, out_dir: str | Path, *, overwrite: bool = False,
              device: str | torch.device | None = None, data_root: str | None = None,
              progress: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run (or finish) a sweep into ``out_dir`` and return all its records.

    Example (tiny):
        >>> cfg = SweepConfig(dataset="digits", arch="mlp", members=2, lams=(0.0, 1.0),
        ...                   seeds=1, epochs=1, n_eval=20, attacks=("fgsm",), eps=(0.1,))
        >>> import tempfile
        >>> recs = run_sweep(cfg, tempfile.mkdtemp(), progress=False, log=lambda s: None)
        >>> [r["lam"] for r in recs]
        [0.0, 1.0]
    """
    config.validate()
    out = Path(out_dir)
    prepare_run_dir(out, config.to_dict(), config_name=SWEEP_CONFIG, resume=not overwrite,
                    overwrite=overwrite, kind="sweep")
    _, test, _ = load_dataset(config.dataset, root=data_root)
    n = min(config.n_eval, len(test))
    x, y = test[:n]
    dev = torch.device(device) if device is not None else None

    t0 = time.perf_counter()
    surrogate, _ = train_run(config.train_config(0.0, config.surrogate_seed),
                             out_dir=out / SURROGATE, resume=True, device=dev,
                             data_root=data_root, progress=progress)
    device_ = next(surrogate.parameters()).device
    x, y = x.to(device_), y.to(device_)
    surrogate_adv = {(a, e): make_attack(a, e, config.steps, config.eval_seed)(surrogate, x, y)
                     for a in config.attacks for e in config.eps}
    log(f"surrogate ready ({time.perf_counter() - t0:.0f}s)")

    records = read_jsonl(out / RECORDS)
    done = {(r["lam"], r["seed"]) for r in records}
    for lam in config.lams:
        for seed in range(config.seeds):
            if (lam, seed) in done:
                continue
            t1 = time.perf_counter()
            tcfg = config.train_config(lam, seed)
            ens, hist = train_run(tcfg, out_dir=out / run_name(lam, seed), resume=True,
                                  device=dev, data_root=data_root, progress=progress)
            t2 = time.perf_counter()
            rec = {"lam": lam, "seed": seed, "diversity": config.diversity,
                   "trained_with": tcfg.diversity, "dataset": config.dataset,
                   "arch": config.arch, "members": config.members, "epochs": config.epochs,
                   "n": n, "eval_seed": config.eval_seed, "surrogate_seed": config.surrogate_seed,
                   **evaluate_point(ens, x, y, config, surrogate_adv, surrogate),
                   "train_seconds": sum(h["train_seconds"] for h in hist),
                   "eval_seconds": time.perf_counter() - t2}
            records.append(rec)
            if is_main_process():
                atomic_write_jsonl(out / RECORDS, records)
            pgd_mid = [a for a in rec["attacks"] if a["attack"] == "pgd"]
            log(f"lam={lam:g} seed={seed}: acc {rec['ensemble_acc']:.3f} "
                f"GDR {rec['gdr']:.4f}±{rec['gdr_sem']:.4f} cos {rec['mean_cos']:.3f}"
                + (f" PGD@{pgd_mid[0]['eps']} white {pgd_mid[0]['whitebox']['rate']:.3f}"
                   if pgd_mid else "") + f" ({time.perf_counter() - t1:.0f}s)")
            for w in rec["warnings"]:
                log(f"  warning: {w}")
    return records
