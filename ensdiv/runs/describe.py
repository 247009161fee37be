"""``ensdiv info`` and ``ensdiv gdr``: what a saved run is, how it trained, how accurate and how
diverse it is on a test split. Reads a run; writes nothing.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "ensemble.pt"
    >>> _ = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10,
    ...                    config={"dataset": "digits"}).save(p)
    >>> describe_run(p)[-1].startswith("test accuracy on digits (n=360)")
    True
"""

from __future__ import annotations

import json
import os

import torch

from ensdiv.data import load_dataset
from ensdiv.ensemble import Ensemble
from ensdiv.errors import EnsdivError, check_choice, check_int
from ensdiv.gdr import ensemble_gdr
from ensdiv.gradients import GRAD_MODES
from ensdiv.io import read_jsonl
from ensdiv.loop import METRICS, accuracies
from ensdiv.runs.rundir import check_fits, ensemble_path, load_run


def _accuracies(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def describe_run(run: str | os.PathLike, *, data_root: str | None = None,
                 device: str | torch.device = "cpu") -> list[str]:
    """The lines ``ensdiv info RUN`` prints: the saved description, the training's last
    metrics, and each member's, the ensemble's and the vote's test accuracy on the data set the
    run was trained on (if it records one)."""
    path = ensemble_path(run)
    ens = Ensemble.load(path, map_location=device)
    desc = ens.description()
    lines = [json.dumps({k: desc[k] for k in ("format", "version", "num_members", "config")},
                        indent=2, sort_keys=True)]
    archs = sorted({m["arch"] for m in desc["members"]})
    lines.append(f"members: {desc['num_members']} x {', '.join(archs)}, input "
                 f"{tuple(desc['members'][0]['in_shape'])}, "
                 f"{desc['members'][0]['num_classes']} classes")
    metrics = path.parent / METRICS
    if metrics.exists():
        records = read_jsonl(metrics, what="metrics file", required=("epoch",),
                             fix="restore it; the ensemble itself is unaffected")
        planned = desc["config"].get("epochs")
        if records:
            lines.append(f"epochs trained: {records[-1]['epoch']}"
                         + (f" of {planned}" if planned else ""))
            lines.append(f"last metrics: {json.dumps(records[-1], sort_keys=True)}")
    dataset = desc["config"].get("dataset")
    if dataset:
        _, test, info = load_dataset(dataset, root=data_root)
        check_fits(ens, dataset, info, run)
        acc = accuracies(ens, test)
        lines.append(f"test accuracy on {dataset} (n={acc['n']}): members "
                     f"{_accuracies(acc['member_acc'])}, ensemble {acc['ensemble_acc']:.4f}, "
                     f"vote {acc['vote_acc']:.4f}")
    return lines


def gdr_line(run: str | os.PathLike, *, mode: str = "loss", dataset: str | None = None,
             limit: int | None = None, batch_size: int = 256, data_root: str | None = None,
             device: str | torch.device = "cpu") -> str:
    """The line ``ensdiv gdr RUN`` prints: the ensemble's Gradient Diversity Rating (Adam &
    Speciel 2020) on the test split (the first ``limit`` samples), with its standard error."""
    check_choice("gradient mode", mode, GRAD_MODES)
    check_int("--batch-size", batch_size)
    if limit is not None:
        check_int("--limit", limit)
    loaded = load_run(run, dataset=dataset, data_root=data_root, device=device)
    ens, test = loaded.ensemble, loaded.test
    if ens.num_members < 2:
        raise EnsdivError(f"GDR needs at least 2 members; {run} has {ens.num_members}")
    if limit is not None:
        test = torch.utils.data.Subset(test, range(min(limit, len(test))))
    res = ensemble_gdr(ens, test, mode=mode, batch_size=batch_size)
    return (f"GDR ({mode} gradients) on {loaded.dataset} test: {res.mean:.4f} ± {res.sem:.4f} "
            f"(n={res.n_used}, excluded {res.n_excluded} with a zero member gradient)")
