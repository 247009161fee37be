"""The ``ensdiv`` command line: ``ensdiv --help`` lists every command.

Bad input prints one line (``ensdiv: error: ...``) and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from ensdiv import __version__
from ensdiv.data import DATASETS, load_dataset
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError
from ensdiv.gdr import ensemble_gdr
from ensdiv.io import read_jsonl
from ensdiv.models import ARCHS
from ensdiv.plots import plot_gdr_vs_attack, plot_transfer_heatmaps
from ensdiv.sweep import RECORDS, SweepConfig, run_sweep
from ensdiv.train import DIVERSITY_CHOICES, ENSEMBLE, TrainConfig, evaluate, train_run


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fmt_acc(values: Sequence[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _print_epoch(record: dict[str, Any]) -> None:
    extra = "".join(f" {k}={record[k]:.4f}" for k in ("mean_cos", "gdr") if k in record)
    print(f"epoch {record['epoch']:>3}  loss {record['loss']:.4f}  members "
          f"{_fmt_acc(record['member_acc'])}  ensemble {record['ensemble_acc']:.4f}{extra}  "
          f"({record['seconds']:.1f}s)", flush=True)


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, metavar="NAME",
                   help=f"one of: {', '.join(DATASETS)} (default {d.dataset})")
    p.add_argument("--arch", default=d.arch, metavar="ARCH",
                   help=f"one of: {', '.join(ARCHS)} (default {d.arch})")
    p.add_argument("--members", type=int, default=d.members, help="ensemble size M")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--diversity", default=d.diversity, metavar="NAME",
                   help=f"regularizer, one of: {', '.join(DIVERSITY_CHOICES)}")
    p.add_argument("--lam", type=float, default=d.lam, help="regularizer weight λ")
    p.add_argument("--noise-sigma", type=float, default=d.noise_sigma,
                   help="std of Gaussian input noise added to training batches")
    p.add_argument("--data-root", default=None,
                   help="folder holding torchvision-format data sets (never downloads)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")


def _config_from(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(dataset=args.dataset, arch=args.arch, members=args.members,
                       epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       weight_decay=args.weight_decay, seed=args.seed,
                       diversity=args.diversity, lam=args.lam,
                       noise_sigma=args.noise_sigma).validate()


def _device(name: str | None) -> str | None:
    if name is not None and name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise EnsdivError(f"unknown device {name!r}; choose one of: cpu, cuda")
    return name


def cmd_train(args: argparse.Namespace) -> int:
    """``ensdiv train``: train one ensemble into ``--out``."""
    config = _config_from(args)
    print(f"training {config.members} x {config.arch} on {config.dataset} "
          f"-> {args.out}", flush=True)
    ens, records = train_run(config, out_dir=args.out, resume=args.resume,
                             overwrite=args.overwrite, device=_device(args.device),
                             data_root=args.data_root, progress=not args.quiet,
                             on_epoch_end=_print_epoch)
    if records:
        print(f"done: ensemble test accuracy {records[-1]['ensemble_acc']:.4f} "
              f"after {records[-1]['epoch']} epochs; files in {args.out}")
    return 0


DEMO_RUNS: tuple[tuple[str, str, float], ...] = (("plain", "none", 0.0), ("GAL", "gal", 0.5))


def demo_report(epochs: int = 8, seed: int = 0, device: str | None = None,
                progress: bool = False) -> list[str]:
    """Train a plain and a GAL ensemble on digits and return the report lines."""
    _, test, info = load_dataset("digits")
    lines = [f"digits ({info.in_shape[1]}x{info.in_shape[2]}, {info.num_classes} classes, "
             f"n_test={info.n_test}), 3 x cnn, {epochs} epochs, seed {seed}; "
             "GDR on the whole test split (lower = more diverse; 0.125 = independent)"]
    for label, diversity, lam in DEMO_RUNS:
        config = TrainConfig(dataset="digits", arch="cnn", members=3, epochs=epochs, seed=seed,
                             lr=3e-3, diversity=diversity, lam=lam)
        t0 = time.perf_counter()
        ens, records = train_run(config, device=device, progress=progress)
        seconds = time.perf_counter() - t0
        last = records[-1]
        res = ensemble_gdr(ens, test)
        lines += [
            f"{label} ensemble (diversity={diversity}, lam={lam}), trained in {seconds:.1f}s",
            f"  member test accuracy:   {_fmt_acc(last['member_acc'])}",
            f"  ensemble test accuracy: {last['ensemble_acc']:.3f} "
            f"(majority vote {last['vote_acc']:.3f})",
            f"  mean gradient cosine {last['mean_cos']:.3f}   GDR {res.mean:.4f} "
            f"± {res.sem:.4f} (n={res.n_used}, excluded {res.n_excluded})",
        ]
    return lines


def cmd_demo(args: argparse.Namespace) -> int:
    """``ensdiv demo``: train a small ensemble on the embedded digits and report."""
    for line in demo_report(epochs=args.epochs, seed=args.seed, device=_device(args.device),
                            progress=not args.quiet):
        print(line, flush=True)
    return 0


def _ensemble_path(run: str) -> Path:
    p = Path(run)
    if p.is_dir():
        p = p / ENSEMBLE
    if not p.is_file():
        raise EnsdivError(f"no ensemble at {run} (expected a run folder with {ENSEMBLE} "
                          "or an ensemble file)")
    return p


def cmd_info(args: argparse.Namespace) -> int:
    """``ensdiv info RUN``: describe a saved ensemble and report its test accuracy."""
    path = _ensemble_path(args.run)
    ens = Ensemble.load(path)
    desc = ens.description()
    print(json.dumps({k: desc[k] for k in ("format", "version", "num_members", "config")},
                     indent=2, sort_keys=True))
    archs = sorted({m["arch"] for m in desc["members"]})
    print(f"members: {desc['num_members']} x {', '.join(archs)}, input "
          f"{tuple(desc['members'][0]['in_shape'])}, {desc['members'][0]['num_classes']} classes")
    dataset = desc["config"].get("dataset")
    if dataset:
        _, test, _ = load_dataset(dataset, root=args.data_root)
        acc = evaluate(ens, test)
        print(f"test accuracy on {dataset} (n={acc['n']}): members "
              f"{_fmt_acc(acc['member_acc'])}, ensemble {acc['ensemble_acc']:.4f}, "
              f"vote {acc['vote_acc']:.4f}")
    return 0


def cmd_gdr(args: argparse.Namespace) -> int:
    """``ensdiv gdr RUN``: the ensemble's Gradient Diversity Rating on the test split."""
    ens = Ensemble.load(_ensemble_path(args.run), map_location=_device(args.device) or "cpu")
    dataset = args.dataset or ens.config.get("dataset")
    if not dataset:
        raise EnsdivError("the ensemble records no dataset; pass --dataset")
    _, test, _ = load_dataset(dataset, root=args.data_root)
    if args.limit is not None:
        if args.limit < 1:
            raise EnsdivError(f"--limit must be positive; got {args.limit}")
        test = torch.utils.data.Subset(test, range(min(args.limit, len(test))))
    res = ensemble_gdr(ens, test, mode=args.mode, batch_size=args.batch_size)
    print(f"GDR ({args.mode} gradients) on {dataset} test: {res.mean:.4f} ± {res.sem:.4f} "
          f"(n={res.n_used}, excluded {res.n_excluded} with a zero member gradient)")
    return 0


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def cmd_sweep(args: argparse.Namespace) -> int:
    """``ensdiv sweep``: one ensemble per (λ, seed), attacked; one record each."""
    config = SweepConfig(dataset=args.dataset, arch=args.arch, members=args.members,
                         diversity=args.diversity, lams=args.lams, seeds=args.seeds,
                         epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         noise_sigma=args.noise_sigma, attacks=args.attacks, eps=args.eps,
                         steps=args.steps, n_eval=args.n_eval, eval_seed=args.eval_seed)
    records = run_sweep(config, args.out, overwrite=args.overwrite,
                        device=_device(args.device), data_root=args.data_root,
                        progress=not args.quiet, log=lambda line: print(line, flush=True))
    print(f"{len(records)} records in {Path(args.out) / RECORDS}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``ensdiv plot gdr-vs-attack RUN``: figures and correlations from a sweep's records."""
    path = Path(args.run)
    path = path / RECORDS if path.is_dir() else path
    records = read_jsonl(path)
    if not records:
        raise EnsdivError(f"no sweep records at {path}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corr = plot_gdr_vs_attack(records, out / "gdr_vs_attack.png")
    try:
        high, low = plot_transfer_heatmaps(records, out / "transfer_heatmaps.png",
                                           attack=args.attack, eps=args.eps)
    except ValueError as e:
        raise EnsdivError(str(e)) from e
    gdrs = [r["gdr"] for r in records]
    print(f"{len(records)} ensembles, GDR {min(gdrs):.4f} .. {max(gdrs):.4f}; figures in {out}")
    print("attack  eps    measure    spearman_rho  p       n")
    for c in corr:
        print(f"{c['attack']:<7} {c['eps']:<6g} {c['measure']:<10} {c['rho']:>12.3f}  "
              f"{c['p']:<7.3g} {c['n']}")
    print(f"heatmaps: plain-most λ={high['lam']:g} (GDR {high['gdr']:.4f}) vs diverse-most "
          f"λ={low['lam']:g} (GDR {low['gdr']:.4f})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(prog="ensdiv", description="Diverse ensembles: train, measure, certify.")
    parser.add_argument("--version", action="version", version=f"ensdiv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("train", help="train an ensemble (plain or with a diversity term)")
    _add_train_args(p)
    p.add_argument("--out", required=True, help="run folder (metrics, checkpoint, ensemble)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train small ensembles on the embedded digits and report")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    sd = SweepConfig()
    p = sub.add_parser("sweep", help="GDR vs attack success: train and attack one ensemble "
                       "per (lambda, seed)")
    p.add_argument("--dataset", default=sd.dataset)
    p.add_argument("--arch", default=sd.arch)
    p.add_argument("--members", type=int, default=sd.members)
    p.add_argument("--diversity", default=sd.diversity)
    p.add_argument("--lams", type=_float_list, default=sd.lams, help="comma-separated λ values")
    p.add_argument("--seeds", type=int, default=sd.seeds, help="seeds per λ (0..N-1)")
    p.add_argument("--epochs", type=int, default=sd.epochs)
    p.add_argument("--batch-size", type=int, default=sd.batch_size)
    p.add_argument("--lr", type=float, default=sd.lr)
    p.add_argument("--noise-sigma", type=float, default=sd.noise_sigma)
    p.add_argument("--attacks", type=_name_list, default=sd.attacks,
                   help="comma-separated: fgsm, pgd, mifgsm")
    p.add_argument("--eps", type=_float_list, default=sd.eps, help="comma-separated L∞ radii")
    p.add_argument("--steps", type=int, default=sd.steps, help="PGD / MI-FGSM steps")
    p.add_argument("--n-eval", type=int, default=sd.n_eval, help="test inputs attacked")
    p.add_argument("--eval-seed", type=int, default=sd.eval_seed)
    p.add_argument("--data-root", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--out", required=True, help="sweep folder (records.jsonl, one run each)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plot", help="figures from records: gdr-vs-attack")
    p.add_argument("kind", choices=["gdr-vs-attack"], help="which figure")
    p.add_argument("run", help="sweep folder or records.jsonl")
    p.add_argument("--out-dir", default="figures")
    p.add_argument("--attack", default="pgd", help="attack of the transfer heatmaps")
    p.add_argument("--eps", type=float, default=None, help="eps of the heatmaps (default: "
                   "largest)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("gdr", help="Gradient Diversity Rating of a saved ensemble (test split)")
    p.add_argument("run", help="run folder or ensemble file")
    p.add_argument("--mode", default="loss", help="gradients of: loss (CE) or margin")
    p.add_argument("--dataset", default=None, help="default: the dataset it was trained on")
    p.add_argument("--data-root", default=None)
    p.add_argument("--limit", type=int, default=None, help="use the first N test samples")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_gdr)

    p = sub.add_parser("info", help="describe a saved ensemble and report its test accuracy")
    p.add_argument("run", help="run folder or ensemble file")
    p.add_argument("--data-root", default=None)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ensdiv`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except EnsdivError as e:
        print(f"ensdiv: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ensdiv: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - needs a GPU
        print(f"ensdiv: error: out of GPU memory ({str(e).splitlines()[0]})", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
