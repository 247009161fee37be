"""The ``ensdiv`` command line: ``ensdiv --help`` lists every command (``python -m ensdiv``
works the same).

Bad input prints one line (``ensdiv: error: ...``) and exits with status 2, never a
traceback; every argument is checked before any work starts. ``train`` and ``sweep`` resume
from ``--out`` alone (``ensdiv train --out RUN --resume``): the folder's config holds every
setting, and an option given with ``--resume`` that differs from it is an error listing it
(except ``--epochs``, which may extend a run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

from ensdiv import __version__, distributed
from ensdiv.adaptive import AGREEMENT_TARGETS, agreement_pgd
from ensdiv.attacks import pgd
from ensdiv.certify_run import certify_dataset
from ensdiv.compare_run import COMPARE_CONFIG, COMPARE_RECORDS, CompareConfig, compare_runs
from ensdiv.data import DATASETS, load_dataset
from ensdiv.detect import SCORE_NAMES, DisagreementDetector, evaluate_detector, weights_fingerprint
from ensdiv.detection_run import DETECT_CONFIG, DetectConfig, detect_into
from ensdiv.detection_run import RECORDS as DETECT_RECORDS
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, EnsdivWarning, check_choice, check_int, check_real
from ensdiv.gdr import ensemble_gdr
from ensdiv.gradients import GRAD_MODES
from ensdiv.io import (
    atomic_write_json,
    os_error,
    prepare_run_dir,
    rank_parts,
    read_json,
    read_jsonl,
    run_lock,
)
from ensdiv.layers import use_compiled_kernels
from ensdiv.models import ARCHS
from ensdiv.objective import OBJECTIVES
from ensdiv.plots import (
    check_plot_options,
    plot_certified,
    plot_detection,
    plot_gdr_vs_attack,
    plot_transfer_heatmaps,
)
from ensdiv.report import (
    certified_table,
    compare_table,
    detection_summary,
    detection_table,
    sweep_tables,
)
from ensdiv.robust_transfer import DEFAULT_TRANSFER_WEIGHT, TRANSFERS
from ensdiv.runtime import available_cores, resolve_device, set_threads
from ensdiv.smoothing import Smooth, max_certifiable_radius
from ensdiv.sweep import RECORDS, SWEEP_ATTACKS, SWEEP_CONFIG, SweepConfig, run_sweep
from ensdiv.train import (
    ADVERSARIAL_ATTACKS,
    CHECKPOINT,
    CONFIG,
    DEFAULT_AT_STEPS,
    DEFAULT_LAM,
    DIVERSITY_CHOICES,
    METRICS,
    TrainConfig,
    ensemble_path,
    evaluate,
    read_checkpoint,
    train_run,
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Formatter(argparse.HelpFormatter):
    """Shows every option's default (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" not in text and action.option_strings
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


def _fmt_acc(values: Sequence[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def _print_epoch(record: dict[str, Any]) -> None:
    extra = "".join(f" {k}={record[k]:.4f}" for k in ("mean_cos", "gdr")
                    if record.get(k) is not None)
    print(f"epoch {record['epoch']:>3}  loss {record['loss']:.4f}  members "
          f"{_fmt_acc(record['member_acc'])}  ensemble {record['ensemble_acc']:.4f}{extra}  "
          f"({record['seconds']:.1f}s)", flush=True)


def _choices(values: Sequence[str]) -> str:
    return "{" + ",".join(values) + "}"


def _show(v: Any) -> str:
    return ",".join(f"{e:g}" if isinstance(e, float) else str(e) for e in v) \
        if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


# Options that set a field of a config dataclass: (flag, field, type, metavar, help). Their
# parser default is None, so the command knows which the user gave (for --resume).
_TRAIN_OPTIONS: tuple[tuple[str, str, Callable[[str], Any], str | None, str], ...] = (
    ("--dataset", "dataset", str, _choices(DATASETS), "data set"),
    ("--arch", "arch", str, _choices(ARCHS), "member architecture"),
    ("--members", "members", int, "M", "ensemble size M"),
    ("--epochs", "epochs", int, None, "training epochs (with --resume: may extend the run)"),
    ("--batch-size", "batch_size", int, None, "training batch size"),
    ("--lr", "lr", float, None, "Adam learning rate"),
    ("--weight-decay", "weight_decay", float, None, "Adam weight decay"),
    ("--seed", "seed", int, None, "seed of the members' initialization and the shuffling"),
    ("--diversity", "diversity", str, _choices(DIVERSITY_CHOICES),
     "gradient-diversity regularizer"),
    ("--lam", "lam", float, "λ", f"regularizer weight λ (default: {DEFAULT_LAM:g} with a "
     "diversity term; 0 and not settable without one)"),
    ("--noise-sigma", "noise_sigma", float, "σ",
     "std of Gaussian pixel noise added to training batches"),
    ("--objective", "objective", str, _choices(OBJECTIVES),
     "standard, or adversarial: every member trained on its own PGD examples (Madry et al.)"),
    ("--attack", "attack", str, _choices(ADVERSARIAL_ATTACKS), "attack of adversarial training"),
    ("--eps", "eps", float, "ε", "L∞ radius of adversarial training (needed with "
     "--objective adversarial; default: none)"),
    ("--steps", "steps", int, None, f"PGD steps of adversarial training (default: "
     f"{DEFAULT_AT_STEPS} with --objective adversarial)"),
    ("--teacher", "teacher", str, "RUN", "robust teacher (a run of one model) whose students "
     "the members become (default: none)"),
    ("--transfer", "transfer", str, _choices(TRANSFERS),
     "how students learn from --teacher: rrm (representation matching, clean inputs) or crt "
     "(logit matching on --noise-sigma noisy inputs)"),
    ("--transfer-weight", "transfer_weight", float, "W", "weight of the students' CE (default: "
     + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TRANSFER_WEIGHT.items()) + ")"),
)

_SWEEP_OPTIONS: tuple[tuple[str, str, Callable[[str], Any], str | None, str], ...] = (
    ("--dataset", "dataset", str, _choices(DATASETS), "data set"),
    ("--arch", "arch", str, _choices(ARCHS), "member architecture"),
    ("--members", "members", int, "M", "ensemble size M"),
    ("--diversity", "diversity", str, _choices(DIVERSITY_CHOICES[1:]),
     "gradient-diversity regularizer (λ = 0 trains plain)"),
    ("--lams", "lams", _float_list, "L1,L2,...", "comma-separated λ values, each once"),
    ("--seeds", "seeds", int, "N", "ensembles per λ (seeds 0..N-1)"),
    ("--epochs", "epochs", int, None, "training epochs of each ensemble"),
    ("--batch-size", "batch_size", int, None, "training batch size"),
    ("--lr", "lr", float, None, "Adam learning rate"),
    ("--noise-sigma", "noise_sigma", float, "σ", "std of Gaussian training noise"),
    ("--attacks", "attacks", _name_list, "A1,A2,...",
     f"comma-separated attacks from: {', '.join(sorted(SWEEP_ATTACKS))} (white-box PGD is the "
     "worst case over PGD, APGD-CE and APGD-DLR)"),
    ("--eps", "eps", _float_list, "E1,E2,...", "comma-separated L∞ radii, each once"),
    ("--steps", "steps", int, None, "PGD / MI-FGSM steps"),
    ("--apgd-steps", "apgd_steps", int, None, "APGD-CE / APGD-DLR iterations (white-box)"),
    ("--n-eval", "n_eval", int, "N", "test inputs attacked (the first N)"),
    ("--eval-seed", "eval_seed", int, None, "seed of PGD's random start"),
)

_DETECT_OPTIONS: tuple[tuple[str, str, Callable[[str], Any], str | None, str], ...] = (
    ("--eps", "eps", float, None, "L∞ radius of every adversary"),
    ("--steps", "steps", int, None, "PGD steps of every adversary"),
    ("--scores", "scores", _name_list, "S1,S2,...",
     f"comma-separated scores from: {', '.join(SCORE_NAMES)}"),
    ("--kappas", "kappas", _float_list, "K1,K2,...",
     "penalty weights κ of the score-penalized adaptive attack"),
    ("--agreement-target", "agreement_target", str, _choices(AGREEMENT_TARGETS),
     "common wrong class of the agreement attack: the ensemble's runner-up, or every class "
     "with the best kept (K-1 times the cost)"),
    ("--fpr", "fpr", float, None, "false-positive rate of the threshold on clean data"),
    ("--n-eval", "n_eval", int, "N", "test images attacked (the first N)"),
    ("--n-calib", "n_calib", int, "N", "held-out clean test images that set the threshold "
     "(the last N)"),
    ("--seed", "seed", int, None, "seed of the attacks' random starts"),
)


_COMPARE_OPTIONS: tuple[tuple[str, str, Callable[[str], Any], str | None, str], ...] = (
    ("--eps", "eps", float, "ε", "L∞ radius of every attack"),
    ("--steps", "steps", int, None, "PGD steps (white-box and transfer)"),
    ("--apgd-steps", "apgd_steps", int, None, "APGD-CE / APGD-DLR iterations"),
    ("--n-eval", "n_eval", int, "N", "test images attacked (the first N)"),
    ("--seed", "eval_seed", int, "SEED", "seed of the attacks and the noise"),
    ("--sigma", "sigma", float, "σ", "smoothing noise std"),
    ("--radii", "radii", _float_list, "R1,R2,...", "radii of the certified accuracy"),
    ("--cert-n", "cert_n", int, "N", "noise samples bounding each certificate"),
    ("--cert-points", "cert_points", int, "N", "test images certified"),
)

def _add_config_options(p: argparse.ArgumentParser, options: Sequence[tuple], defaults: Any,
                        ) -> None:
    for flag, field, type_, metavar, text in options:
        default = getattr(defaults, field)
        if "default" not in text:
            text = f"{text} (default: {_show(default)})"
        p.add_argument(flag, dest=field, type=type_, default=None, metavar=metavar,
                       help=text)


def _given(args: argparse.Namespace, options: Sequence[tuple]) -> dict[str, Any]:
    """The config fields set on the command line (None means: not given)."""
    return {o[1]: getattr(args, o[1]) for o in options if getattr(args, o[1]) is not None}


def _resolve_config(cls: type, given: dict[str, Any], out: str, resume: bool,
                    config_name: str, kind: str, command: str) -> Any:
    """The config a command runs: the given options over the defaults, or, with ``--resume``,
    over the config saved in ``out`` (a difference is reported by the run folder check)."""
    path = Path(out) / config_name
    if resume and path.exists():
        saved = read_json(path, what=f"{kind} config",
                          fix=f"restore it, or start the {kind} in another --out")
        try:
            base = cls.from_dict(saved)
        except (EnsdivError, TypeError) as e:
            raise EnsdivError(f"{path} is not a valid {kind} config ({e}); restore it, or "
                              f"start the {kind} in another --out") from None
        return dataclasses.replace(base, **given)
    if resume and not given:
        raise EnsdivError(f"{out} holds no {kind} to resume (no {config_name}); start one with "
                          f"`{command} --out {out} [options]`")
    return cls(**given)


def _add_common(p: argparse.ArgumentParser, *, data: bool = True, quiet: bool = True) -> None:
    if data:
        p.add_argument("--data-root", default=None, metavar="DIR",
                       help="folder holding torchvision-format data sets, never downloaded "
                            "(default: $ENSDIV_DATA or ./data)")
    p.add_argument("--device", default=None, metavar="{cpu,cuda,cuda:N}",
                   help="where to compute (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help=f"CPU threads (default: the cores available, {available_cores()})")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_training_speed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="fuse GroupNorm's double backward with torch.compile (diversity "
                        "training; compiles once per activation shape, tens of seconds on CPU)")


def _setup(args: argparse.Namespace) -> torch.device:
    """Threads, device and kernels from the common options, checked before any work."""
    if args.threads is not None:
        check_int("--threads", args.threads)
    threads = args.threads
    if threads is None and distributed.launched():  # the cores shared by this node's ranks
        threads = max(1, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    set_threads(threads)
    device = distributed.init_from_env(resolve_device(args.device))
    args.rank_stdout = sys.stdout  # where a rank's own lines go (a sweep's ensembles)
    if not distributed.is_main():  # one copy of every message: rank 0's (errors still show)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    if getattr(args, "compile", False):
        use_compiled_kernels(True)
    return device


def cmd_train(args: argparse.Namespace) -> int:
    """``ensdiv train``: train one ensemble into ``--out`` (or continue it with --resume)."""
    args.resume_hint = f"ensdiv train --out {args.out} --resume"
    given = _given(args, _TRAIN_OPTIONS)
    if args.amp:
        given["amp"] = True
    config = _resolve_config(TrainConfig, given, args.out, args.resume,
                             CONFIG, "run", "ensdiv train").validate()
    if args.resume and args.threads is None and (Path(args.out) / CHECKPOINT).exists():
        # Same thread count as before the interruption, so the resumed run is bit-for-bit
        # the uninterrupted one (CPU reductions depend on it).
        args.threads = read_checkpoint(Path(args.out) / CHECKPOINT).get("threads")
    device = _setup(args)
    print(f"training {config.members} x {config.arch} on {config.dataset} "
          f"-> {args.out}", flush=True)
    ens, records = train_run(config, out_dir=args.out, resume=args.resume,
                             overwrite=args.overwrite, device=device,
                             data_root=args.data_root, progress=not args.quiet,
                             on_epoch_end=_print_epoch)
    if records:
        print(f"done: ensemble test accuracy {records[-1]['ensemble_acc']:.4f} "
              f"after {records[-1]['epoch']} epochs; files in {args.out}")
    return 0


DEMO_RUNS: tuple[tuple[str, str, float], ...] = (("plain", "none", 0.0), ("GAL", "gal", 0.5))


def demo_report(epochs: int = 8, seed: int = 0, device: str | torch.device | None = None,
                progress: bool = False) -> list[str]:
    """Train a plain and a GAL ensemble on digits and return the report lines."""
    configs = [TrainConfig(dataset="digits", arch="cnn", members=3, epochs=epochs, seed=seed,
                           diversity=diversity, lam=lam).validate()
               for _, diversity, lam in DEMO_RUNS]
    _, test, info = load_dataset("digits")
    lines = [f"digits ({info.in_shape[1]}x{info.in_shape[2]}, {info.num_classes} classes, "
             f"n_test={info.n_test}), 3 x cnn, {epochs} epochs, seed {seed}; "
             "GDR on the whole test split (lower = more diverse; 0.125 = independent)"]
    for (label, diversity, lam), config in zip(DEMO_RUNS, configs, strict=True):
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
            _demo_detection(ens.eval(), test, seed),
            _demo_certify(ens, test, seed),
        ]
    return lines


def _demo_certify(ens: Ensemble, test: torch.utils.data.TensorDataset, seed: int) -> str:
    """One line: randomized-smoothing certificates of the first few test images."""
    sigma, n, alpha, count = 0.25, 1_000, 0.001, 10
    smooth = Smooth(ens, num_classes=10, sigma=sigma, seed=seed)
    x, y = test.tensors
    radii = []
    for i in range(count):
        cls, radius = smooth.certify(x[i].to(next(ens.parameters()).device), n0=100, n=n,
                                     alpha=alpha, batch_size=n)
        radii.append(radius if cls == int(y[i]) else 0.0)
    ok = [r for r in radii if r > 0]
    return (f"  smoothing (σ {sigma}, n {n}, α {alpha}): {len(ok)} of {count} test images "
            f"certified correct, median radius {statistics.median(ok) if ok else 0:.3f} "
            f"(at most {max_certifiable_radius(sigma, n, alpha):.3f} at these settings)")


def _demo_detection(ens: Ensemble, test: torch.utils.data.TensorDataset, seed: int) -> str:
    """One line: the mutual-information detector's AUROC against white-box PGD and against the
    adaptive agreement attack (first half of the test split attacked, second half calibrates)."""
    x, y = test.tensors
    dev = next(ens.parameters()).device
    half = len(y) // 2
    xe, ye, xc = x[:half].to(dev), y[:half].to(dev), x[half:].to(dev)
    det = DisagreementDetector(ens, score="mean_kl_to_mean").fit(xc)
    white = pgd(ens, xe, ye, eps=DEMO_EPS, steps=20, keep="last",
                generator=torch.Generator().manual_seed(seed))
    agree = agreement_pgd(ens, xe, ye, eps=DEMO_EPS, steps=20, detector=det,
                          generator=torch.Generator().manual_seed(seed))
    w, a = (evaluate_detector(det, xe, ye, adv) for adv in (white, agree))
    return (f"  detection (mutual information, 5% FPR; PGD-20 at L∞ {DEMO_EPS}): AUROC white-box "
            f"{w.auroc:.3f}, adaptive {a.auroc:.3f}; detection-aware robust acc. "
            f"{w.detection_robust_acc:.3f} vs {a.detection_robust_acc:.3f}")


DEMO_EPS = 0.3


def cmd_demo(args: argparse.Namespace) -> int:
    """``ensdiv demo``: train a small ensemble on the embedded digits and report."""
    check_int("--epochs", args.epochs)
    check_int("--seed", args.seed, minimum=0)
    device = _setup(args)
    for line in demo_report(epochs=args.epochs, seed=args.seed, device=device,
                            progress=not args.quiet):
        print(line, flush=True)
    return 0


def _check_dataset_fits(ens: Ensemble, dataset: str, shape: Sequence[int], run: str) -> None:
    if ens.in_shape is not None and tuple(shape) != tuple(ens.in_shape):
        trained = ens.config.get("dataset")
        raise EnsdivError(f"{run} takes inputs of shape {tuple(ens.in_shape)}, but {dataset} "
                          f"has {tuple(shape)}" + (f"; it was trained on {trained}"
                                                   if trained else ""))


def cmd_info(args: argparse.Namespace) -> int:
    """``ensdiv info RUN``: describe a saved ensemble, its training, and its test accuracy."""
    device = _setup(args)
    path = ensemble_path(args.run)
    ens = Ensemble.load(path, map_location=device)
    desc = ens.description()
    print(json.dumps({k: desc[k] for k in ("format", "version", "num_members", "config")},
                     indent=2, sort_keys=True))
    archs = sorted({m["arch"] for m in desc["members"]})
    print(f"members: {desc['num_members']} x {', '.join(archs)}, input "
          f"{tuple(desc['members'][0]['in_shape'])}, {desc['members'][0]['num_classes']} classes")
    metrics = path.parent / METRICS
    if metrics.exists():
        records = read_jsonl(metrics, what="metrics file", required=("epoch",),
                             fix="restore it; the ensemble itself is unaffected")
        planned = desc["config"].get("epochs")
        if records:
            print(f"epochs trained: {records[-1]['epoch']}"
                  + (f" of {planned}" if planned else ""))
            print(f"last metrics: {json.dumps(records[-1], sort_keys=True)}")
    dataset = desc["config"].get("dataset")
    if dataset:
        _, test, info = load_dataset(dataset, root=args.data_root)
        _check_dataset_fits(ens, dataset, info.in_shape, args.run)
        acc = evaluate(ens, test)
        print(f"test accuracy on {dataset} (n={acc['n']}): members "
              f"{_fmt_acc(acc['member_acc'])}, ensemble {acc['ensemble_acc']:.4f}, "
              f"vote {acc['vote_acc']:.4f}")
    return 0


def cmd_gdr(args: argparse.Namespace) -> int:
    """``ensdiv gdr RUN``: the ensemble's Gradient Diversity Rating on the test split."""
    check_choice("gradient mode", args.mode, GRAD_MODES)
    check_int("--batch-size", args.batch_size)
    if args.limit is not None:
        check_int("--limit", args.limit)
    if args.dataset is not None:
        check_choice("dataset", args.dataset, DATASETS)
    device = _setup(args)
    ens = Ensemble.load(ensemble_path(args.run), map_location=device)
    if ens.num_members < 2:
        raise EnsdivError(f"GDR needs at least 2 members; {args.run} has {ens.num_members}")
    dataset = args.dataset or ens.config.get("dataset")
    if not dataset:
        raise EnsdivError("the ensemble records no dataset; pass --dataset")
    _, test, info = load_dataset(dataset, root=args.data_root)
    _check_dataset_fits(ens, dataset, info.in_shape, args.run)
    if args.limit is not None:
        test = torch.utils.data.Subset(test, range(min(args.limit, len(test))))
    res = ensemble_gdr(ens, test, mode=args.mode, batch_size=args.batch_size)
    print(f"GDR ({args.mode} gradients) on {dataset} test: {res.mean:.4f} ± {res.sem:.4f} "
          f"(n={res.n_used}, excluded {res.n_excluded} with a zero member gradient)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``ensdiv sweep``: one ensemble per (λ, seed), attacked; one record each."""
    args.resume_hint = f"ensdiv sweep --out {args.out} --resume"
    config = _resolve_config(SweepConfig, _given(args, _SWEEP_OPTIONS), args.out, args.resume,
                             SWEEP_CONFIG, "sweep", "ensdiv sweep").validate()
    device = _setup(args)
    records = run_sweep(config, args.out, resume=args.resume, overwrite=args.overwrite,
                        device=device, data_root=args.data_root, progress=not args.quiet,
                        log=lambda line: print(line, file=args.rank_stdout, flush=True))
    print(f"{len(records)} records in {Path(args.out) / RECORDS}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    """``ensdiv detect RUN --out DIR``: every disagreement score against every adversary."""
    args.resume_hint = f"ensdiv detect {args.run} --out {args.out} --resume"
    given = _given(args, _DETECT_OPTIONS)
    saved_path = Path(args.out) / DETECT_CONFIG
    if args.resume and saved_path.exists():
        saved = read_json(saved_path, what="detection config",
                          fix="restore it, or start the detection run in another --out")
        fields = {f.name for f in dataclasses.fields(DetectConfig)}
        try:
            base = DetectConfig.from_dict({k: v for k, v in saved.items() if k in fields})
        except (EnsdivError, TypeError) as e:
            raise EnsdivError(f"{saved_path} is not a valid detection config ({e}); restore "
                              "it, or start the run in another --out") from None
        config = dataclasses.replace(base, **given)
    elif args.resume and not given:
        raise EnsdivError(f"{args.out} holds no detection run to resume (no {DETECT_CONFIG}); "
                          f"start one with `ensdiv detect {args.run} --out {args.out}`")
    else:
        config = DetectConfig(**given)
    config.validate()
    if args.dataset is not None:
        check_choice("dataset", args.dataset, DATASETS)
    device = _setup(args)
    records = detect_into(ensemble_path(args.run), config, args.out, dataset=args.dataset,
                          resume=args.resume, overwrite=args.overwrite, device=device,
                          data_root=args.data_root, log=lambda line: print(line, flush=True))
    print()
    print(detection_table(records))
    print(f"\n{len(records)} records in {Path(args.out) / DETECT_RECORDS}")
    return 0


CERTIFY_CONFIG = "certify.json"
CERTIFY_RECORDS = "records.jsonl"


def _parse_stages(text: str) -> tuple[int, ...]:
    """``--stages 1000,10000,100000`` as a tuple of sample sizes ≥ 1."""
    try:
        stages = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise EnsdivError(f"--stages must be comma-separated sample sizes like "
                          f"1000,10000,100000; got {text!r}") from None
    for s in stages:
        check_int("--stages size", s)
    return stages


def cmd_certify(args: argparse.Namespace) -> int:
    """``ensdiv certify RUN --sigma S --out DIR``: randomized-smoothing certificates, one
    record per test example, resumable."""
    args.resume_hint = f"ensdiv certify {args.run} --out {args.out} --resume"
    if not (math.isfinite(args.sigma) and args.sigma > 0):
        raise EnsdivError(f"--sigma must be a finite number > 0; got {args.sigma!r}")
    for name in ("n0", "n", "batch_size", "skip"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.max is not None:
        check_int("--max", args.max)
    check_real("--alpha", args.alpha, minimum=0)
    if not 0 < args.alpha < 1:
        raise EnsdivError(f"--alpha must be in (0, 1); got {args.alpha!r}")
    if args.radius is not None:
        check_real("--radius", args.radius, minimum=0)
    stages = _parse_stages(args.stages)
    check_int("--seed", args.seed, minimum=0)
    if args.dataset is not None:
        check_choice("dataset", args.dataset, DATASETS)
    device = _setup(args)
    path = ensemble_path(args.run)
    ens = Ensemble.load(path, map_location=device)
    dataset = args.dataset or ens.config.get("dataset")
    if not dataset:
        raise EnsdivError("the ensemble records no dataset; pass --dataset")
    _, test, info = load_dataset(dataset, root=args.data_root)
    _check_dataset_fits(ens, dataset, info.in_shape, args.run)
    base: torch.nn.Module = ens
    if args.member is not None:
        check_int("--member", args.member, minimum=0)
        if args.member >= ens.num_members:
            raise EnsdivError(f"--member {args.member} does not exist; {args.run} has "
                              f"{ens.num_members} members (0..{ens.num_members - 1})")
        base = Ensemble([ens.members[args.member]]).to(device).eval()
    if args.vote and ens.num_members < 2 and args.member is None:
        raise EnsdivError("--vote needs an ensemble of at least 2 members")
    config = {"ensemble": str(path), "dataset": dataset, "member": args.member,
              "sigma": args.sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha,
              "skip": args.skip, "max": args.max, "radius": args.radius,
              "stages": list(stages) if args.radius is not None else None, "vote": args.vote,
              "seed": args.seed, "trained_sigma": ens.config.get("noise_sigma"),
              "weights": weights_fingerprint(ens)}
    if args.amp:  # only when set: folders of earlier runs resume unchanged
        config["amp"] = True
    trained = ens.config.get("noise_sigma")
    if trained is not None and abs(float(trained) - args.sigma) > 1e-12:
        warnings.warn(f"certifying at sigma {args.sigma:g}, but {args.run} was trained with "
                      f"noise sigma {float(trained):g}: smoothing works best at the training "
                      "sigma", EnsdivWarning, stacklevel=1)
    if args.radius is None:
        cap = max_certifiable_radius(args.sigma, args.n, args.alpha)
        how = f"n={args.n}, alpha={args.alpha:g}"
    else:  # the last stage at alpha/K bounds what staged sampling can reach
        cap = max_certifiable_radius(args.sigma, max(stages), args.alpha / len(stages))
        how = f"stages {','.join(map(str, stages))}, alpha={args.alpha:g}"
    print(f"certifying {dataset} with sigma {args.sigma:g}, {how}: "
          f"no radius above {cap:.3f} can be certified at these settings", flush=True)
    if args.radius is not None and args.radius >= cap:
        warnings.warn(f"--radius {args.radius:g} is at or above {cap:.3f}: every example will "
                      "abstain", EnsdivWarning, stacklevel=1)
    with run_lock(args.out) as out:
        def prepare() -> None:  # rank 0 under torchrun; the others get its outcome
            prepare_run_dir(out, config, config_name=CERTIFY_CONFIG, resume=args.resume,
                            overwrite=args.overwrite,
                            started=lambda p: (p / CERTIFY_RECORDS).exists()
                            or bool(rank_parts(p / CERTIFY_RECORDS)),
                            kind="certification run", command=f"ensdiv certify {args.run}")
            atomic_write_json(out / CERTIFY_CONFIG, config)

        distributed.broadcast_outcome(prepare)
        records = certify_dataset(base, test, sigma=args.sigma, n0=args.n0, n=args.n,
                                  alpha=args.alpha, batch_size=args.batch_size,
                                  out=out / CERTIFY_RECORDS, skip=args.skip, max=args.max,
                                  radius=args.radius, stages=stages, vote=args.vote,
                                  seed=args.seed, amp=args.amp,
                                  num_classes=info.num_classes, progress=not args.quiet)
    print(certified_table([(Path(args.run).name, config, records)]))
    print(f"{len(records)} records in {Path(args.out) / CERTIFY_RECORDS}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``ensdiv compare RUN... --out DIR``: cost, clean/robust accuracy, transfer, GDR and
    certified accuracy of several runs on the same images and seeds."""
    args.resume_hint = f"ensdiv compare ... --out {args.out} --resume"
    labels = list(_name_list(args.labels)) if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise EnsdivError(f"--labels names {len(labels)} runs but {len(args.runs)} were given")
    if len(set(labels)) != len(labels):
        raise EnsdivError(f"labels must differ; got {', '.join(labels)} (give --labels)")
    # with --resume the saved settings hold; the runs are named again (more may be added)
    config = _resolve_config(CompareConfig, _given(args, _COMPARE_OPTIONS), args.out,
                             args.resume, COMPARE_CONFIG, "comparison",
                             "ensdiv compare RUN...").validate()
    runs = [(label, ensemble_path(run).parent) for label, run in zip(labels, args.runs,
                                                                      strict=True)]
    device = _setup(args)
    settings = config.to_dict()  # runs may be added on --resume; each record names its run
    with run_lock(args.out) as out:
        prepare_run_dir(out, settings, config_name=COMPARE_CONFIG, resume=args.resume,
                        overwrite=args.overwrite,
                        started=lambda p: (p / COMPARE_RECORDS).exists(),
                        kind="comparison", command="ensdiv compare")
        atomic_write_json(out / COMPARE_CONFIG, settings)
        records = compare_runs(runs, config, out, device=device, data_root=args.data_root,
                               progress=not args.quiet, log=lambda line: print(line, flush=True))
    print()
    print(compare_table(records))
    print(f"\n{len(records)} records in {Path(args.out) / COMPARE_RECORDS}")
    return 0


def _figure_dir(out_dir: str | None, records_folder: Path) -> Path:
    """Where a plot command writes: ``--out-dir``, else ``figures/`` beside the records."""
    out = Path(out_dir) if out_dir is not None else records_folder / "figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error("write", out, e) from None
    return out


def _certify_records(folder: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = Path(folder)
    if not (path / CERTIFY_RECORDS).exists():
        raise EnsdivError(f"no certification records at {path / CERTIFY_RECORDS}; run "
                          f"`ensdiv certify RUN --out {folder}` first")
    config = read_json(path / CERTIFY_CONFIG, what="certification config",
                       fix="restore it, or certify again into another --out")
    records = read_jsonl(path / CERTIFY_RECORDS, what="certification records file",
                         missing_ok=False, required=("idx", "radius", "correct"),
                         fix="delete its damaged lines and resume the certification")
    return config, records


def _detection_records(folder: str) -> list[dict[str, Any]]:
    path = Path(folder)
    path = path / DETECT_RECORDS if path.is_dir() else path
    if not path.exists():
        raise EnsdivError(f"no detection records at {path}; run `ensdiv detect RUN --out "
                          f"{folder}` first")
    records = read_jsonl(path, what="detection records file", missing_ok=False,
                         required=("score", "adversary", "roc", "auroc"),
                         fix="restore it, or resume the detection run to rewrite it")
    if not records:
        raise EnsdivError(f"no detection records in {path}")
    return records


def cmd_plot(args: argparse.Namespace) -> int:
    """``ensdiv plot gdr-vs-attack RUN`` (figures and correlations from a sweep's records) or
    ``ensdiv plot detection DIR...`` (ROC curves from detection records)."""
    if args.kind == "certified":
        runs = [(Path(d).name, *_certify_records(d)) for d in args.run]
        out = _figure_dir(args.out_dir, Path(args.run[0]))
        plot_certified([(label, recs) for label, _, recs in runs], out / "certified.png")
        print(f"certified accuracy of {len(runs)} run(s) in {out / 'certified.png'}")
        if args.table:
            print()
            print(certified_table(runs))
        return 0
    if args.kind == "detection":
        runs = [_detection_records(d) for d in args.run]
        out = _figure_dir(args.out_dir, Path(args.run[0]))
        plot_detection(runs, out / "detection_roc.png")
        print(f"ROC curves of {len(runs)} run(s) in {out / 'detection_roc.png'}")
        if args.table:
            print()
            print(detection_summary(runs))
            for recs in runs:
                print()
                print(detection_table(recs))
        return 0
    if len(args.run) != 1:
        raise EnsdivError(f"plot gdr-vs-attack takes one sweep folder; got {len(args.run)}")
    path = Path(args.run[0])
    folder = path if path.is_dir() else path.parent
    path = path / RECORDS if path.is_dir() else path
    if not path.exists():
        raise EnsdivError(f"no sweep records at {path}; run `ensdiv sweep --out {folder}` first")
    records = read_jsonl(path, what="sweep records file", missing_ok=False,
                         required=("lam", "seed", "gdr", "attacks", "n"),
                         fix="restore it, or resume the sweep to rewrite it")
    if not records:
        raise EnsdivError(f"no sweep records in {path}; the sweep has not finished an ensemble")
    attack, eps = check_plot_options(records, attack=args.attack, eps=args.eps)
    out = _figure_dir(args.out_dir, folder)
    corr = plot_gdr_vs_attack(records, out / "gdr_vs_attack.png")
    high, low = plot_transfer_heatmaps(records, out / "transfer_heatmaps.png",
                                       attack=attack, eps=eps)
    gdrs = [r["gdr"] for r in records if r["gdr"] is not None]
    print(f"{len(records)} ensembles, GDR {min(gdrs):.4f} .. {max(gdrs):.4f}; figures in {out}")
    print("attack  eps    measure    spearman_rho  p       n")
    for c in corr:
        print(f"{c['attack']:<7} {c['eps']:<6g} {c['measure']:<10} {c['rho']:>12.3f}  "
              f"{c['p']:<7.3g} {c['n']}")
    print(f"heatmaps: plain-most λ={high['lam']:g} (GDR {high['gdr']:.4f}) vs diverse-most "
          f"λ={low['lam']:g} (GDR {low['gdr']:.4f})")
    if args.table:
        print()
        print(sweep_tables(records))
    return 0


def _add_out_options(p: argparse.ArgumentParser, holds: str, resume_help: str) -> None:
    """``--out`` (required), ``--resume`` and ``--overwrite``: the result-folder rules every
    resumable command shares (:func:`ensdiv.io.prepare_run_dir`)."""
    p.add_argument("--out", required=True, metavar="DIR" if "run" not in holds else "RUN",
                   help=holds)
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--overwrite", action="store_true",
                   help="delete what --out holds and start again")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = _Parser(prog="ensdiv", formatter_class=_Formatter,
                     description="Diverse ensembles: train, measure, attack. "
                                 "Run `ensdiv COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"ensdiv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)

    p = add("train", "train an ensemble (plain or with a diversity term); resumable")
    _add_config_options(p, _TRAIN_OPTIONS, TrainConfig())
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the loss (mixed precision, for GPUs; saved "
                        "with the run)")
    _add_out_options(p, "run folder (config, metrics, checkpoint, ensemble)",
                     "continue the run in --out with its saved settings")
    _add_common(p)
    _add_training_speed(p)
    p.set_defaults(func=cmd_train)

    p = add("demo", "train plain and GAL ensembles on the embedded digits and report")
    p.add_argument("--epochs", type=int, default=8, help="epochs per ensemble")
    p.add_argument("--seed", type=int, default=0, help="seed of both ensembles")
    _add_common(p, data=False)
    p.set_defaults(func=cmd_demo)

    p = add("sweep", "GDR vs attack success: train and attack one ensemble per (λ, seed); "
                     "resumable")
    _add_config_options(p, _SWEEP_OPTIONS, SweepConfig())
    _add_out_options(p, "sweep folder (sweep.json, records.jsonl, one folder per ensemble)",
                     "continue the sweep in --out with its saved settings")
    _add_common(p)
    _add_training_speed(p)
    p.set_defaults(func=cmd_sweep)

    p = add("detect", "detect adversarial inputs by member disagreement, judged against "
                      "transfer, white-box and adaptive attacks; resumable")
    p.add_argument("run", help="run folder or ensemble file")
    _add_config_options(p, _DETECT_OPTIONS, DetectConfig())
    p.add_argument("--dataset", default=None, metavar=_choices(DATASETS),
                   help="test split to use (default: the one the ensemble was trained on)")
    _add_out_options(p, "result folder (detect.json, records.jsonl)",
                     "continue the detection run in --out with its saved settings")
    _add_common(p, quiet=False)
    p.set_defaults(func=cmd_detect)

    p = add("compare", "compare trained runs on the same images: training time, clean and "
                       "white-box robust accuracy, transfer between members, GDR, certified "
                       "accuracy; resumable")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders made by ensdiv train")
    p.add_argument("--labels", default=None, metavar="L1,L2,...",
                   help="row names (default: the folders' names)")
    _add_config_options(p, _COMPARE_OPTIONS, CompareConfig())
    _add_out_options(p, "result folder (compare.json, records.jsonl, certificates)",
                     "continue the comparison in --out")
    _add_common(p)
    p.set_defaults(func=cmd_compare)

    p = add("certify", "randomized-smoothing certificates (Cohen et al.) of a member or the "
                       "ensemble, one record per test example; resumable")
    p.add_argument("run", help="run folder or ensemble file")
    p.add_argument("--sigma", type=float, required=True, help="noise std in pixel units")
    p.add_argument("--n0", type=int, default=100, help="samples that pick the class")
    p.add_argument("--n", type=int, default=10_000, help="samples that bound its probability")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--batch-size", type=int, default=100,
                   help="noisy copies per forward pass (about 100 is fastest on CPU)")
    p.add_argument("--skip", type=int, default=1, help="certify every SKIP-th test example")
    p.add_argument("--max", type=int, default=None, help="at most this many examples "
                   "(default: all)")
    p.add_argument("--radius", type=float, default=None,
                   help="only ask whether each example is certified at this radius, with "
                        "staged sampling (default: certify the largest radius)")
    p.add_argument("--stages", default="1000,10000,100000",
                   help="with --radius: noise samples of each stage, fresh per stage "
                        "(default: 1000,10000,100000)")
    p.add_argument("--member", type=int, default=None,
                   help="certify this member alone (default: the whole ensemble)")
    p.add_argument("--vote", action="store_true",
                   help="base prediction = the members' majority vote (default: mean softmax)")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the noisy forward passes (GPUs; saved with the "
                        "run)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise")
    p.add_argument("--dataset", default=None, metavar=_choices(DATASETS),
                   help="test split (default: the one the ensemble was trained on)")
    _add_out_options(p, "result folder (certify.json, records.jsonl)",
                     "continue the certification run in --out")
    _add_common(p)
    p.set_defaults(func=cmd_certify)

    p = add("plot", "figures from records: a sweep's GDR vs attack success, detection ROCs, or "
                    "certified accuracy")
    p.add_argument("kind", choices=["gdr-vs-attack", "detection", "certified"],
                   help="which figure")
    p.add_argument("run", nargs="+",
                   help="gdr-vs-attack: one sweep folder (or its records.jsonl); detection: "
                        "one or more detection folders (e.g. a plain and a diverse ensemble)")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="where the figures go (default: the first RUN/figures)")
    p.add_argument("--attack", default=None, metavar=_choices(sorted(SWEEP_ATTACKS)),
                   help="attack of the transfer heatmaps (default: pgd if the records hold "
                        "it, else their first)")
    p.add_argument("--eps", type=float, default=None,
                   help="eps of the heatmaps (default: the largest in the records)")
    p.add_argument("--table", action="store_true",
                   help="also print the markdown tables the README shows (means ± standard "
                        "errors over seeds, transfer fall, correlations)")
    p.set_defaults(func=cmd_plot)

    p = add("gdr", "Gradient Diversity Rating of a saved ensemble on a test split")
    p.add_argument("run", help="run folder or ensemble file")
    p.add_argument("--mode", default="loss", metavar=_choices(GRAD_MODES),
                   help="gradients of the cross-entropy (loss) or of the margin toward the "
                        "runner-up class (margin)")
    p.add_argument("--dataset", default=None, metavar=_choices(DATASETS),
                   help="test split to use (default: the data set it was trained on)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use the first N test samples (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="inputs per gradient pass")
    _add_common(p, quiet=False)
    p.set_defaults(func=cmd_gdr)

    p = add("info", "describe a saved ensemble, its training and its test accuracy")
    p.add_argument("run", help="run folder or ensemble file")
    _add_common(p, quiet=False)
    p.set_defaults(func=cmd_info)
    return parser


_shown: set[str] = set()


def _show_warning(message: Warning | str, category: type[Warning], filename: str,
                  lineno: int, file: Any = None, line: str | None = None) -> None:
    if issubclass(category, EnsdivWarning):
        if str(message) not in _shown:  # a config is validated at several layers: say it once
            _shown.add(str(message))
            print(f"ensdiv: warning: {message}", file=sys.stderr, flush=True)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


#: Commands that run under torchrun (data-parallel training, sharded certification and sweeps).
DISTRIBUTED_COMMANDS = ("train", "certify", "sweep")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ensdiv`` console script and of ``python -m ensdiv``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _shown.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("always", EnsdivWarning)
        warnings.showwarning = _show_warning
        try:
            if distributed.launched() and args.command not in DISTRIBUTED_COMMANDS:
                raise EnsdivError(f"ensdiv {args.command} runs in one process; start it without "
                                  f"torchrun (torchrun runs: {', '.join(DISTRIBUTED_COMMANDS)})")
            return int(args.func(args))
        except EnsdivError as e:
            print(f"ensdiv: error: {e}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # the reader left (`ensdiv ... | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except OSError as e:  # any file problem not already named: still one line
            print(f"ensdiv: error: {os_error('use', e.filename or '?', e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            hint = getattr(args, "resume_hint", None)
            print("ensdiv: interrupted" + (f"; continue with: {hint}" if hint else ""),
                  file=sys.stderr)
            return 130
        except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - needs a GPU
            print(f"ensdiv: error: out of GPU memory ({str(e).splitlines()[0]})",
                  file=sys.stderr)
            return 1
        except torch.distributed.DistError as e:  # a rank died or timed out
            print(f"ensdiv: error: another process of this torchrun job failed or timed out "
                  f"({str(e).splitlines()[0][:200]}); run the same command with --resume "
                  "to continue from the last checkpoint", file=sys.stderr)
            return 1
        finally:
            distributed.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
