"""Optimizers and learning-rate schedules the field's recipes use: Adam or SGD (momentum,
Nesterov, weight decay), and a constant, cosine or step-decay learning rate, optionally after a
linear warm-up, counted in epochs or in optimizer steps.

:class:`Optim` is one recipe's choice; :meth:`Optim.build` makes torch's optimizer and a
``LambdaLR`` scheduler stepped after every optimizer step. The scheduler's factor is a pure
function of the step count (:meth:`Optim.factor`), so a run killed mid-schedule and resumed
from its checkpoint (optimizer and scheduler state) continues with exactly the learning rates
of an uninterrupted run. With ``unit="epoch"`` the factor changes only at epoch boundaries, as
the papers' ``MultiStepLR``/``StepLR`` stepped once per epoch do.

The schedules (``t`` counts units done, ``T`` the run's units, ``w`` the warm-up units):

- warm-up: factor (t + 1) / w for t < w (PyTorch's ``LinearLR`` from 1/w to 1);
- ``constant``: 1;
- ``cosine``: ½ (1 + cos(π (t − w) / (T − w))) (``CosineAnnealingLR`` to 0, Loshchilov & Hutter
  2017);
- ``step``: γ^(number of milestones ≤ t) (``MultiStepLR``; milestones in units).

Example:
    >>> o = Optim(name="sgd", lr=0.1, momentum=0.9, schedule="step", milestones=(100, 150))
    >>> [o.factor(t, 200) for t in (0, 99, 100, 150)]
    [1.0, 1.0, 0.1, 0.010000000000000002]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ensdiv.errors import EnsdivError, check_choice, check_int, check_real

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import OPTIMIZERS as OPTIMIZERS
from ensdiv.vocab import SCHEDULES as SCHEDULES
from ensdiv.vocab import SGD_MOMENTUM as SGD_MOMENTUM
from ensdiv.vocab import UNITS as UNITS


@dataclasses.dataclass(frozen=True)
class Optim:
    """An optimizer with its learning-rate schedule (see the module docstring).

    ``momentum`` and ``nesterov`` belong to SGD (``momentum`` None there means
    :data:`SGD_MOMENTUM`); ``milestones`` and ``gamma`` to the step schedule; ``warmup`` counts
    ``unit``\\ s of linear warm-up before any schedule.

    Example:
        >>> Optim().validate().factor(5, 10), Optim(schedule="cosine").factor(5, 10)
        (1.0, 0.5)
    """

    name: str = "adam"
    lr: float = 3e-3
    weight_decay: float = 0.0
    momentum: float | None = None
    nesterov: bool = False
    schedule: str = "constant"
    warmup: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    unit: str = "epoch"

    def validate(self) -> Optim:
        """The settings with SGD's momentum resolved, or one :class:`EnsdivError` naming the
        first bad one."""
        check_choice("optimizer", self.name, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("schedule unit", self.unit, UNITS)
        check_real("learning rate", self.lr, minimum=0, strict=True)
        check_real("weight decay", self.weight_decay, minimum=0)
        if not isinstance(self.nesterov, bool):
            raise EnsdivError(f"nesterov must be true or false; got {self.nesterov!r}")
        momentum = self.momentum
        if self.name == "sgd":
            momentum = SGD_MOMENTUM if momentum is None else check_real("momentum", momentum,
                                                                          minimum=0)
            if momentum >= 1:
                raise EnsdivError(f"momentum must be in [0, 1); got {momentum:g}")
            if self.nesterov and momentum == 0:
                raise EnsdivError("Nesterov momentum needs a momentum > 0")
        elif momentum is not None or self.nesterov:
            raise EnsdivError("--momentum and --nesterov are SGD's; add --optimizer sgd (or "
                              "drop them)")
        check_int("warm-up", self.warmup, minimum=0)
        milestones = tuple(self.milestones)
        if self.schedule == "step":
            if not milestones:
                raise EnsdivError("the step schedule needs --milestones (e.g. 100,150)")
            for m in milestones:
                check_int("milestone", m)
            if any(b <= a for a, b in zip(milestones, milestones[1:], strict=False)):
                raise EnsdivError("milestones must be in increasing order; got "
                                  + ",".join(map(str, milestones)))
            gamma = check_real("gamma", self.gamma, minimum=0, strict=True)
            if gamma > 1:
                raise EnsdivError(f"gamma must be in (0, 1] (a decay); got {gamma:g}")
        elif milestones:
            raise EnsdivError("--milestones belong to the step schedule; add --schedule step "
                              "(or drop them)")
        return dataclasses.replace(self, momentum=momentum, milestones=milestones,
                                   lr=float(self.lr), weight_decay=float(self.weight_decay),
                                   gamma=float(self.gamma))

    def factor(self, t: int, total: int) -> float:
        """The learning rate's multiplier after ``t`` of ``total`` units (0-based ``t``).

        Example:
            >>> o = Optim(schedule="cosine", warmup=2)
            >>> [round(o.factor(t, 6), 3) for t in range(6)]
            [0.5, 1.0, 1.0, 0.854, 0.5, 0.146]
        """
        w = self.warmup
        if t < w:
            return (t + 1) / w
        if self.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * (t - w) / max(total - w, 1)))
        if self.schedule == "step":
            return self.gamma ** sum(1 for m in self.milestones if m <= t)
        return 1.0

    def units(self, steps_per_epoch: int, epochs: int) -> int:
        """How many ``unit``\\ s a run of ``epochs`` epochs of ``steps_per_epoch`` steps has."""
        return epochs if self.unit == "epoch" else epochs * steps_per_epoch

    def check_run(self, steps_per_epoch: int, epochs: int) -> None:
        """One :class:`EnsdivError` if the warm-up is as long as the run. (A milestone beyond
        the run is allowed: a recipe shortened with ``--epochs`` never reaches it.)"""
        total = self.units(steps_per_epoch, epochs)
        if self.warmup >= total and self.warmup:
            raise EnsdivError(f"a warm-up of {self.warmup} {self.unit}s does not fit a run of "
                              f"{total} {self.unit}s")

    def build(self, params: Iterable[nn.Parameter], *, steps_per_epoch: int,
              epochs: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        """torch's optimizer over ``params`` and its scheduler, to be stepped after every
        optimizer step (a run of ``epochs`` epochs of ``steps_per_epoch`` steps).

        Example:
            >>> p = [nn.Parameter(torch.zeros(2))]
            >>> opt, sched = Optim(name="sgd", lr=0.1).build(p, steps_per_epoch=3, epochs=2)
            >>> type(opt).__name__, opt.param_groups[0]["momentum"]
            ('SGD', 0.9)
        """
        o = self.validate()
        o.check_run(steps_per_epoch, epochs)
        params = list(params)
        if o.name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=o.lr, momentum=o.momentum or 0.0, nesterov=o.nesterov,
                weight_decay=o.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
        total = o.units(steps_per_epoch, epochs)
        per = steps_per_epoch if o.unit == "epoch" else 1

        def factor(k: int) -> float:  # a function: LambdaLR keeps it out of its state_dict
            return o.factor(k // per, total)

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)

    def to_record(self) -> dict[str, Any]:
        """The settings as a record states them."""
        return dataclasses.asdict(self.validate())
