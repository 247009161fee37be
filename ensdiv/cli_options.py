"""The vocabulary of the command line: the parser class, the options of each command and how
they map onto a config's fields. :mod:`ensdiv.cli` builds the parser from these and dispatches.

Options that set a config field are declared once as ``(flag, field, type, metavar, help)``;
their parser default is None, so a command knows which the user gave (what ``--resume`` must
not override).

Example:
    >>> float_list("0.1,0.3"), name_list("fgsm, pgd")
    ((0.1, 0.3), ('fgsm', 'pgd'))
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ensdiv.errors import EnsdivError
from ensdiv.runtime import available_cores
from ensdiv.tuning import METHODS as TUNE_METHODS
from ensdiv.vocab import (
    ADVERSARIAL_ATTACKS,
    AGGREGATIONS,
    AGREEMENT_TARGETS,
    ARCHS,
    AUGMENTS,
    COMPILE_MIN_STEPS,
    COMPILE_MODES,
    DATASETS,
    DEFAULT_AT_STEPS,
    DEFAULT_LAM,
    DEFAULT_TRANSFER_WEIGHT,
    DIVERSITIES,
    FETCHABLE,
    GRAD_MODES,
    METHOD_LAM,
    OBJECTIVES,
    OPTIMIZERS,
    SCHEDULES,
    SCORE_NAMES,
    SGD_MOMENTUM,
    TRANSFER_ATTACKS,
    TRANSFERS,
    UNITS,
)

Option = tuple[str, str, Callable[[str], Any], str | None, str]
"""(flag, config field, type, metavar, help) of an option that sets a config field."""


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, and reads a value that starts with a
    minus and a digit (``--lams -1,1``, ``--eps -0.1``) as the value it is, so the command's
    own check can say what is wrong with it (argparse took ``-1,1`` for an option)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # no ensdiv option starts with a digit: "-<digit>…" and "-.<digit>…" are values
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class Formatter(argparse.HelpFormatter):
    """Shows every option's default (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        lazy = getattr(action, "config_default", None)
        if lazy is not None:  # a config field's default, computed now that help is shown
            defaults, field = lazy
            return f"{text} (default: {show(getattr(defaults(), field))})".replace("%", "%%")
        if ("default" not in text and action.option_strings
                and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
            text += " (default: %(default)s)"
        return text


def choices(values: Sequence[str]) -> str:
    return "{" + ",".join(values) + "}"


def show(v: Any) -> str:
    return ",".join(f"{e:g}" if isinstance(e, float) else str(e) for e in v) \
        if isinstance(v, tuple) else f"{v:g}" if isinstance(v, float) else str(v)


def float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


def stage_sizes(text: str) -> tuple[int, ...]:
    """``--stages 1000,10000,100000`` as integers (``CertifyConfig`` checks each ≥ 1); parsed
    by the command, not argparse, so that a resumed run's saved stages are not re-parsed."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise EnsdivError(f"--stages must be comma-separated sample sizes like "
                          f"1000,10000,100000; got {text!r}") from None


def name_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers, got {text!r}") from None


def on_off(text: str) -> bool:
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


# Options that set a field of a config dataclass: (flag, field, type, metavar, help). Their
# parser default is None, so the command knows which the user gave (for --resume).
TRAIN_OPTIONS: tuple[Option, ...] = (
    ("--dataset", "dataset", str, choices(DATASETS), "data set"),
    ("--arch", "arch", str, choices(ARCHS), "member architecture"),
    ("--members", "members", int, "M", "ensemble size M"),
    ("--epochs", "epochs", int, None, "training epochs (with --resume: may extend the run)"),
    ("--batch-size", "batch_size", int, None, "training batch size"),
    ("--lr", "lr", float, None, "learning rate (the schedule's peak)"),
    ("--weight-decay", "weight_decay", float, None, "weight decay (L2, coupled: torch's)"),
    ("--optimizer", "optimizer", str, choices(OPTIMIZERS), "adam, or sgd (with --momentum, "
     "--nesterov)"),
    ("--momentum", "momentum", float, "μ", f"SGD's momentum (default: {SGD_MOMENTUM:g} with "
     "--optimizer sgd)"),
    ("--nesterov", "nesterov", on_off, "{on,off}", "SGD's Nesterov momentum"),
    ("--schedule", "schedule", str, choices(SCHEDULES), "learning-rate schedule: constant, "
     "cosine (to 0) or step (× --gamma at each of --milestones)"),
    ("--warmup", "warmup", int, "N", "linear warm-up over the first N schedule units"),
    ("--milestones", "milestones", int_list, "M1,M2,...", "with --schedule step: where the "
     "rate drops, in schedule units, in increasing order (default: none)"),
    ("--gamma", "gamma", float, "γ", "with --schedule step: the factor at each milestone"),
    ("--schedule-unit", "schedule_unit", str, choices(UNITS), "count the schedule (warm-up, "
     "milestones) in epochs, as the papers step it, or in optimizer steps"),
    ("--augment", "augment", str, choices(AUGMENTS), "crop-flip: pad-4 random crop and "
     "horizontal flip (the CIFAR-10 standard; refused on digit data sets)"),
    ("--val-fraction", "val_fraction", float, "F", "hold out a stratified share F of the "
     "training split as validation data (each epoch records its accuracy) (default: none)"),
    ("--val-seed", "val_seed", int, None, "seed of the validation split (the same for every "
     "training seed, so runs are compared on one split)"),
    ("--init-from", "init_from", str, "RUN", "start the members from a trained ensemble of the "
     "same architecture and size (a run folder or ensemble file) (default: none)"),
    ("--seed", "seed", int, None, "seed of the members' initialization and the shuffling"),
    ("--diversity", "diversity", str, choices(DIVERSITIES),
     "diversity regularizer or baseline (adp: Pang et al. 2019; trs: Yang et al. 2021; "
     "dverge: Yang et al. 2020)"),
    ("--lam", "lam", float, "λ", f"regularizer weight λ (default: {DEFAULT_LAM:g} with a "
     "diversity term, TRS's λ_a " + f"{METHOD_LAM['trs']:g} and DVERGE's "
     f"{METHOD_LAM['dverge']:g} with theirs; 0 and not settable without one)"),
    ("--adp-alpha", "adp_alpha", float, "α", "with --diversity adp: weight of the ensemble "
     "entropy (λ is ADP's β) (default: 2, the authors')"),
    ("--trs-smooth", "trs_smooth", float, "λ_b", "with --diversity trs: weight of the "
     "smoothness term, mean squared per-sample input-gradient norm (λ is TRS's λ_a, default "
     "10) (default: 1.22e-3, the authors' script's default at batch 128)"),
    ("--trs-eps", "trs_eps", float, "ε", "with --diversity trs: L∞ radius of the smoothness "
     "points, growing from --trs-eps-start over the epochs; 0: clean inputs only (default: "
     "0.2, the authors' script's)"),
    ("--trs-eps-start", "trs_eps_start", float, "ε0", "with --diversity trs: the smoothness "
     "radius at the first epoch (default: half of --trs-eps, the authors' script's ratio)"),
    ("--dverge-eps", "dverge_eps", float, "ε", "with --diversity dverge: L∞ radius of the "
     "feature distillation (λ weighs the cross-training term, default 1) (default: 0.07)"),
    ("--dverge-steps", "dverge_steps", int, None, "with --diversity dverge: distillation "
     "steps, each of size ε/10 (default: 10)"),
    ("--dverge-layer", "dverge_layer", int, "L", "with --diversity dverge: distil at this "
     "hidden layer every epoch (mlp 1-2, cnn[-nf] 1-3, resnet20[-fixup] 1-20) (default: a "
     "layer drawn anew each epoch)"),
    ("--dverge-clean", "dverge_clean", float, "W", "with --diversity dverge: weight of an "
     "added clean-data CE (default: 0, the authors')"),
    ("--noise-sigma", "noise_sigma", float, "σ",
     "std of Gaussian pixel noise added to training batches"),
    ("--objective", "objective", str, choices(OBJECTIVES),
     "standard, or adversarial: every member trained on its own PGD examples (Madry et al.)"),
    ("--attack", "attack", str, choices(ADVERSARIAL_ATTACKS), "attack of adversarial training"),
    ("--eps", "eps", float, "ε", "L∞ radius of adversarial training (needed with "
     "--objective adversarial; default: none)"),
    ("--steps", "steps", int, None, f"PGD steps of adversarial training (default: "
     f"{DEFAULT_AT_STEPS} with --objective adversarial)"),
    ("--teacher", "teacher", str, "RUN", "robust teacher (a run of one model) whose students "
     "the members become (default: none)"),
    ("--transfer", "transfer", str, choices(TRANSFERS),
     "how students learn from --teacher: rrm (representation matching, clean inputs) or crt "
     "(logit matching on --noise-sigma noisy inputs)"),
    ("--transfer-weight", "transfer_weight", float, "W", "weight of the students' CE (default: "
     + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_TRANSFER_WEIGHT.items()) + ")"),
)

SWEEP_OPTIONS: tuple[Option, ...] = (
    ("--dataset", "dataset", str, choices(DATASETS), "data set"),
    ("--arch", "arch", str, choices(ARCHS), "member architecture"),
    ("--members", "members", int, "M", "ensemble size M"),
    ("--diversity", "diversity", str, choices(DIVERSITIES[1:]),
     "diversity regularizer or baseline at its defaults (λ = 0 trains plain; adp: λ is its β, "
     "trs: its λ_a, dverge: the cross-training weight)"),
    ("--lams", "lams", float_list, "L1,L2,...", "comma-separated λ values, each once"),
    ("--seeds", "seeds", int, "N", "ensembles per λ (seeds 0..N-1)"),
    ("--epochs", "epochs", int, None, "training epochs of each ensemble"),
    ("--batch-size", "batch_size", int, None, "training batch size"),
    ("--lr", "lr", float, None, "Adam learning rate"),
    ("--noise-sigma", "noise_sigma", float, "σ", "std of Gaussian training noise"),
    ("--attacks", "attacks", name_list, "A1,A2,...",
     f"comma-separated attacks from: {', '.join(sorted(TRANSFER_ATTACKS))} (white-box PGD is the "
     "worst case over PGD, APGD-CE and APGD-DLR)"),
    ("--eps", "eps", float_list, "E1,E2,...", "comma-separated L∞ radii, each once"),
    ("--steps", "steps", int, None, "PGD / MI-FGSM steps"),
    ("--apgd-steps", "apgd_steps", int, None, "APGD-CE / APGD-DLR iterations (white-box)"),
    ("--n-eval", "n_eval", int, "N", "test inputs attacked (the first N)"),
    ("--eval-seed", "eval_seed", int, None, "seed of PGD's random start"),
    ("--val-fraction", "val_fraction", float, "F", "train every ensemble without a stratified "
     "share F of the training split (default: none)"),
    ("--val-seed", "val_seed", int, None, "seed of the validation split"),
    ("--eval-split", "eval_split", str, "{test,val}", "where the ensembles are attacked: the "
     "test split, or the held-out validation split (for tuning; needs --val-fraction)"),
)

DETECT_OPTIONS: tuple[Option, ...] = (
    ("--eps", "eps", float, None, "L∞ radius of every adversary"),
    ("--steps", "steps", int, None, "PGD steps of every adversary"),
    ("--scores", "scores", name_list, "S1,S2,...",
     f"comma-separated scores from: {', '.join(SCORE_NAMES)}"),
    ("--kappas", "kappas", float_list, "K1,K2,...",
     "penalty weights κ of the score-penalized adaptive attack"),
    ("--agreement-target", "agreement_target", str, choices(AGREEMENT_TARGETS),
     "common wrong class of the agreement attack: the ensemble's runner-up, or every class "
     "with the best kept (K-1 times the cost)"),
    ("--fpr", "fpr", float, None, "false-positive rate of the threshold on clean data"),
    ("--n-eval", "n_eval", int, "N", "test images attacked (the first N)"),
    ("--n-calib", "n_calib", int, "N", "held-out clean test images that set the threshold "
     "(the last N)"),
    ("--seed", "seed", int, None, "seed of the attacks' random starts"),
)


TUNE_OPTIONS: tuple[Option, ...] = (
    ("--dataset", "dataset", str, choices(DATASETS), "data set"),
    ("--arch", "arch", str, choices(ARCHS), "member architecture"),
    ("--members", "members", int, "M", "ensemble size M"),
    ("--methods", "methods", name_list, "M1,M2,...", "methods whose declared grids run, from: "
     + ", ".join(TUNE_METHODS)),
    ("--epochs", "epochs", int, None, "training epochs of every grid point"),
    ("--batch-size", "batch_size", int, None, "training batch size"),
    ("--lr", "lr", float, None, "learning rate (Adam), the schedule's peak"),
    ("--schedule", "schedule", str, choices(SCHEDULES), "learning-rate schedule of every "
     "point (step needs milestones: use ensdiv train for it)"),
    ("--seed", "seed", int, None, "the one training seed of every point"),
    ("--val-fraction", "val_fraction", float, "F", "share of the training split held out as "
     "the validation split the proxies are measured on"),
    ("--val-seed", "val_seed", int, None, "seed of the validation split"),
    ("--eps", "eps", float, "ε", "L∞ radius the methods' training radii are scaled to (the "
     "evaluation's) and the proxies are measured at"),
    ("--n", "n", int, None, "validation images the proxies attack"),
    ("--transfer-steps", "transfer_steps", int, None, "PGD steps of the transfer examples"),
    ("--apgd-steps", "apgd_steps", int, None, "APGD-CE steps of the white-box proxy"),
    ("--eval-seed", "eval_seed", int, None, "seed of the proxies' attacks"),
    ("--tolerance", "tolerance", float, None, "the rule: clean validation accuracy at least "
     "the plain ensemble's minus this"),
)

COMPARE_OPTIONS: tuple[Option, ...] = (
    ("--eps", "eps", float, "ε", "L∞ radius of every attack"),
    ("--steps", "steps", int, None, "PGD steps of the transfer examples"),
    ("--apgd-steps", "apgd_steps", int, None, "APGD-CE / APGD-DLR iterations"),
    ("--mora-steps", "mora_steps", int, None, "MORA iterations per mixing weight"),
    ("--square-queries", "square_queries", int, None, "Square's query budget"),
    ("--n-eval", "n_eval", int, "N", "test images attacked (the first N)"),
    ("--seed", "eval_seed", int, "SEED", "seed of the attacks and the noise"),
    ("--sigma", "sigma", float, "σ", "smoothing noise std"),
    ("--radii", "radii", float_list, "R1,R2,...", "radii of the certified accuracy"),
    ("--cert-n", "cert_n", int, "N", "noise samples bounding each certificate"),
    ("--cert-points", "cert_points", int, "N", "test images certified"),
)

EVALUATE_OPTIONS: tuple[Option, ...] = (
    ("--eps", "eps", float, "ε", "L∞ radius of every attack"),
    ("--n", "n", int, "N", "test images evaluated (the first N)"),
    ("--aggregation", "aggregations", name_list, "RULE,...",
     f"aggregation rules, comma-separated, of {choices(AGGREGATIONS)}; one evaluation each, "
     "the first is the card's headline"),
    ("--apgd-steps", "apgd_steps", int, None, "APGD-CE / APGD-DLR iterations"),
    ("--mora-steps", "mora_steps", int, None, "MORA iterations per mixing weight"),
    ("--square-queries", "square_queries", int, None, "Square's query budget"),
    ("--transfer-steps", "transfer_steps", int, None, "PGD steps of the transfer examples"),
    ("--seed", "seed", int, "SEED", "seed of every random start and of the noise"),
    ("--surrogate", "surrogate", str, "RUN|plain", "independent model the transfer examples "
     "are crafted on: a run folder of the same data set, or 'plain' (a plain ensemble like "
     "RUN, trained once and cached in $ENSDIV_CACHE or ~/.cache/ensdiv) (default: none)"),
    ("--sigma", "sigma", float, "σ", "also certify the ensemble by randomized smoothing at "
     "this noise std (default: no certificates)"),
    ("--radii", "radii", float_list, "R1,R2,...", "radii of the certified accuracy"),
    ("--cert-n", "cert_n", int, "N", "noise samples bounding each certificate"),
    ("--cert-points", "cert_points", int, "N", "test images certified"),
    ("--name", "name", str, "NAME", "the card's name (default: the run folder's)"),
)

CERTIFY_OPTIONS: tuple[Option, ...] = (
    ("--sigma", "sigma", float, "σ", "noise std in pixel units (needed unless resuming; "
     "default: none)"),
    ("--n0", "n0", int, None, "samples that pick the class"),
    ("--n", "n", int, None, "samples that bound its probability"),
    ("--alpha", "alpha", float, None, "failure probability"),
    ("--skip", "skip", int, None, "certify every SKIP-th test example"),
    ("--max", "max", int, None, "at most this many examples (default: all)"),
    ("--radius", "radius", float, None, "only ask whether each example is certified at this "
     "radius, with staged sampling (default: certify the largest radius)"),
    ("--stages", "stages", str, None, "with --radius: noise samples of each stage, "
     "fresh per stage"),
    ("--member", "member", int, None, "certify this member alone (default: the whole "
     "ensemble)"),
    ("--seed", "seed", int, None, "seed of the noise"),
)


def add_config_options(p: argparse.ArgumentParser, options: Sequence[tuple],
                       defaults: Callable[[], Any]) -> None:
    """Add ``options`` to ``p``; ``defaults()`` (called only when a help text is shown) is the
    config whose field values the help gives as each option's default."""
    for flag, field, type_, metavar, text in options:
        action = p.add_argument(flag, dest=field, type=type_, default=None, metavar=metavar,
                                help=text)
        if "default:" not in text:  # "at its defaults" must not hide the default
            action.config_default = (defaults, field)  # type: ignore[attr-defined]


def given_options(args: argparse.Namespace, options: Sequence[tuple]) -> dict[str, Any]:
    """The config fields set on the command line (None means: not given)."""
    return {o[1]: getattr(args, o[1]) for o in options if getattr(args, o[1]) is not None}


def add_common(p: argparse.ArgumentParser, *, data: bool = True, quiet: bool = True) -> None:
    if data:
        p.add_argument("--data-root", default=None, metavar="DIR",
                       help="folder holding torchvision-format data sets, never downloaded "
                            "(default: $ENSDIV_DATA or ./data)")
    p.add_argument("--device", default=None, metavar="{cpu,cuda,cuda:N}",
                   help="where to compute (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: $OMP_NUM_THREADS if set, else the cores "
                   f"available, {available_cores()})")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_training_speed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=COMPILE_MODES,
                   help="fuse GroupNorm's double backward with torch.compile (diversity "
                        "training; ~12 s of compiling per activation shape on CPU, reported "
                        "per epoch). auto: on for CPU runs of GroupNorm members with a "
                        f"double-backprop term and ≥ {COMPILE_MIN_STEPS:,} steps "
                        "(default: auto; --compile alone: on)")


def add_out_options(p: argparse.ArgumentParser, holds: str, resume_help: str, *,
                    required: bool = True) -> None:
    """``--out``, ``--resume`` and ``--overwrite``: the result-folder rules every
    resumable command shares (:func:`ensdiv.runs.rundir.prepare_run_dir`)."""
    p.add_argument("--out", required=required, metavar="DIR" if "run" not in holds else "RUN",
                   help=holds if required else f"{holds} (no default: needed unless --table)")
    p.add_argument("--resume", action="store_true", help=resume_help)
    p.add_argument("--overwrite", action="store_true",
                   help="delete what --out holds and start again")


def add_evaluate_flags(p: argparse.ArgumentParser, defaults: Callable[[], Any]) -> None:
    """The options of ``ensdiv evaluate`` (``defaults()``: an ``EvaluateConfig``)."""
    p.add_argument("run", nargs="?", default=None, metavar="RUN",
                   help="run folder made by ensdiv train (not needed with --resume)")
    add_config_options(p, EVALUATE_OPTIONS, defaults)
    p.add_argument("--table", nargs="+", default=None, metavar="DIR",
                   help="print one leaderboard row per card and rule from these card folders "
                        "(or card.json files) and stop (default: evaluate RUN)")
    p.add_argument("--by-method", action="store_true",
                   help="with --table: one row per training method (mean ± s.e. over its "
                        "cards, e.g. seeds) instead of per card")
    add_out_options(p, "card folder (evaluate.json, parts/, card.json, card.md)",
                    "continue the evaluation in --out with its saved settings", required=False)


def add_certify_flags(p: argparse.ArgumentParser) -> None:
    """The certify options that are not settings of the run (speed, switches, data set)."""
    p.add_argument("--batch-size", type=int, default=100,
                   help="noisy copies per forward pass (about 100 is fastest on CPU)")
    p.add_argument("--vote", action="store_true",
                   help="base prediction = the members' majority vote (default: mean softmax)")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the noisy forward passes (GPUs; saved with the "
                        "run)")
    p.add_argument("--dataset", default=None, metavar=choices(DATASETS),
                   help="test split (default: the one the ensemble was trained on)")


def add_plot_flags(p: argparse.ArgumentParser) -> None:
    """The options of ``ensdiv plot``."""
    p.add_argument("kind", choices=["gdr-vs-attack", "detection", "certified", "methods"],
                   help="which figure")
    p.add_argument("run", nargs="+",
                   help="gdr-vs-attack: one or more sweep folders (or their records.jsonl), "
                        "drawn and tabled together; detection: one or more detection folders "
                        "(e.g. a plain and a diverse ensemble); certified: one or more "
                        "certification folders (ensdiv certify --out); methods: the card "
                        "folders of a comparison (ensdiv evaluate --out), one per seed")
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="where the figures go (default: the first RUN/figures)")
    p.add_argument("--attack", default=None, metavar=choices(sorted(TRANSFER_ATTACKS)),
                   help="attack of the transfer heatmaps (default: pgd if the records hold "
                        "it, else their first)")
    p.add_argument("--eps", type=float, default=None,
                   help="eps of the heatmaps (default: the largest in the records)")
    p.add_argument("--table", action="store_true",
                   help="also print the markdown tables docs/ shows (means ± standard "
                        "errors over seeds, transfer fall, correlations)")


def add_gdr_flags(p: argparse.ArgumentParser) -> None:
    """The options of ``ensdiv gdr``."""
    p.add_argument("run", help="run folder or ensemble file")
    p.add_argument("--mode", default="loss", metavar=choices(GRAD_MODES),
                   help="gradients of the cross-entropy (loss) or of the margin toward the "
                        "runner-up class (margin)")
    p.add_argument("--dataset", default=None, metavar=choices(DATASETS),
                   help="test split to use (default: the data set it was trained on)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="use the first N test samples (default: all)")
    p.add_argument("--batch-size", type=int, default=256, help="inputs per gradient pass")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """The options of ``ensdiv data``."""
    p.add_argument("action", choices=["fetch"], help="what to do")
    p.add_argument("name", metavar=choices(FETCHABLE), help="data set")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="data root (default: $ENSDIV_DATA or ./data, where --data-root looks)")
    p.add_argument("--force", action="store_true", help="replace a copy that fails the check")
