"""The Ensemble: M member networks evaluated together, stacked with torch.func or in a loop.

Two execution paths give the same numbers (tested to float32 round-off):

- ``"stacked"``: the members' parameters are stacked along a new leading axis and one
  ``torch.func.functional_call`` is ``vmap``-ed over it (same-architecture members only);
- ``"loop"``: a Python loop over the member modules (any members, heterogeneous included).

``path="auto"`` picks per device from measurement: on CPU the loop (``benchmarks/bench_ensemble.py``
measured a vmapped stack of small CNNs 2-4x slower than the loop on 2 cores); on other devices
both paths are timed once on the first batch and the faster is kept (:meth:`Ensemble.autotune`).

The members stay ordinary modules (one optimizer, one ``state_dict``); the stacked path stacks
their parameters on every call with ``torch.stack``, which is differentiable, so gradients reach
the members through either path.

Example:
    >>> import torch
    >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0)
    >>> x = torch.rand(5, 1, 8, 8)
    >>> ens.member_logits(x).shape, ens(x).shape, ens.predict(x).shape
    (torch.Size([3, 5, 10]), torch.Size([5, 10]), torch.Size([5]))
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ensdiv._version import __version__
from ensdiv.aggregation import majority_vote, mean_log_softmax
from ensdiv.errors import EnsdivError, check_choice, check_range, check_shape, model_input_spec
from ensdiv.io import atomic_torch_save, first_sentence, read_torch
from ensdiv.models import Member, build_model

ExecPath = Literal["auto", "stacked", "loop"]
EXEC_PATHS: tuple[str, ...] = get_args(ExecPath)

# Measured defaults (benchmarks/bench_ensemble.py); devices not listed are autotuned.
MEASURED_DEFAULT_PATH: dict[str, str] = {"cpu": "loop"}

FORMAT = "ensdiv.ensemble/1"


class Ensemble(nn.Module):
    """M classifiers whose prediction is the mean of their softmax outputs.

    Args:
        members: M ≥ 1 modules mapping [B, C, H, W] in [0, 1] to logits [B, K].
        path: execution path, one of ``EXEC_PATHS``; ``"stacked"`` needs members of one class
            with identically named and shaped parameters and buffers.
        config: free-form JSON-able description of how the ensemble was trained (saved with it).

    ``forward`` returns ``log(mean_m softmax(logits_m))`` [B, K], so ``cross_entropy(ens(x), y)``
    is the ensemble's negative log-likelihood and any attack expecting logits works on it.

    Input range: :meth:`predict` and :meth:`vote` (the entry points for class decisions) refuse
    pixels outside [0, 1] — ``ens.predict(x * 255)`` is one clear error, not wrong classes.
    ``forward`` and :meth:`member_logits` check shape and dtype only (no device sync): they are
    the module interface that Gaussian-noise training and randomized smoothing feed ``x + noise``
    outside [0, 1] on purpose; the attacks, ``fit`` and every evaluation check their images
    before calling them.

    Example:
        >>> ens = Ensemble([nn.Linear(4, 3), nn.Linear(4, 3)])
        >>> bool(torch.allclose(ens(torch.rand(2, 4)).exp().sum(-1), torch.ones(2)))
        True
    """

    def __init__(self, members: Sequence[nn.Module], *, path: str = "auto",
                 config: dict[str, Any] | None = None) -> None:
        super().__init__()
        if len(members) < 1:
            raise EnsdivError("an ensemble needs at least 1 member")
        self.members = nn.ModuleList(members)
        self.path = check_choice("execution path", path, EXEC_PATHS)
        self.in_shape, self.num_classes = _common_spec(self.members)
        self.config: dict[str, Any] = dict(config or {})
        self._tuned: dict[str, str] = {}
        self.refresh_skeleton()  # built now: a deepcopy fails once parameters are swapped out
        if path == "stacked" and not self.homogeneous:
            raise EnsdivError("path='stacked' needs members of one architecture; use 'loop'")

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, arch: str, m: int, *, in_shape: Sequence[int], num_classes: int,
              seed: int = 0, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None, path: str = "auto",
              config: dict[str, Any] | None = None) -> Ensemble:
        """Build M freshly initialized members of one architecture (member i seeded seed·1000+i).

        Example:
            >>> Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10).num_members
            2
        """
        if int(m) < 1:
            raise EnsdivError(f"members must be >= 1; got {m}")
        members = []
        for i in range(int(m)):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(seed) * 1000 + i)
                members.append(build_model(arch, in_shape=in_shape, num_classes=num_classes,
                                           mean=mean, std=std))
        return cls(members, path=path, config=config)

    @property
    def num_members(self) -> int:
        """M, the number of members."""
        return len(self.members)

    @property
    def homogeneous(self) -> bool:
        """Whether all members share class and parameter/buffer names and shapes."""
        first = self.members[0]

        def sig(mod: nn.Module) -> tuple:
            return (type(mod),
                    tuple((k, v.shape) for k, v in mod.named_parameters()),
                    tuple((k, v.shape) for k, v in mod.named_buffers()))

        s0 = sig(first)
        return all(sig(m) == s0 for m in self.members[1:])

    # ------------------------------------------------------------------ stacked state
    def stacked_state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Members' parameters and buffers stacked along a new leading axis of size M.

        The stack is differentiable: gradients flow back to each member's own parameters.
        """
        if not self.homogeneous:
            raise EnsdivError("stacking needs members of one architecture")
        named = [dict(m.named_parameters()) for m in self.members]
        bufs = [dict(m.named_buffers()) for m in self.members]
        params = {k: torch.stack([d[k] for d in named]) for k in named[0]}
        buffers = {k: torch.stack([d[k] for d in bufs]) for k in bufs[0]}
        return params, buffers

    def refresh_skeleton(self) -> None:
        """Rebuild the skeleton from member 0; call after editing the members' layers in place."""
        # kept out of the submodules, so it stays out of state_dict() and .to()
        self.__dict__["_skeleton"] = copy.deepcopy(self.members[0]).to("meta")

    def skeleton(self) -> nn.Module:
        """A parameter-free ('meta') copy of member 0 in the ensemble's mode, to call
        functionally with stacked parameters."""
        sk = self.__dict__["_skeleton"]
        sk.train(self.training)
        return sk

    def functional_logits(self, params: dict[str, Tensor], buffers: dict[str, Tensor],
                          x: Tensor) -> Tensor:
        """Logits [M, B, K] of all members from stacked ``params``/``buffers`` via vmap."""
        skeleton = self.skeleton()

        def one(p: dict[str, Tensor], b: dict[str, Tensor], xx: Tensor) -> Tensor:
            return functional_call(skeleton, (p, b), (xx,))

        return vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, x)

    # ------------------------------------------------------------------ evaluation
    def resolve_path(self, x: Tensor) -> str:
        """The execution path used for input ``x`` ("stacked" or "loop")."""
        if self.path != "auto":
            return self.path
        if not self.homogeneous or self.num_members == 1:
            return "loop"
        dev = x.device.type
        if dev in MEASURED_DEFAULT_PATH:
            return MEASURED_DEFAULT_PATH[dev]
        if dev not in self._tuned:
            self.autotune(x)
        return self._tuned[dev]

    def autotune(self, x: Tensor, repeats: int = 3) -> dict[str, float]:
        """Time forward+backward of both paths on ``x`` and remember the faster for its device.

        Returns the median seconds per path. Parameters' ``.grad`` are left untouched.

        Example:
            >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
            >>> sorted(ens.autotune(torch.rand(8, 1, 8, 8)))
            ['loop', 'stacked']
        """
        times: dict[str, float] = {}
        params = [p for p in self.parameters() if p.requires_grad]
        for name in ("loop", "stacked"):
            runs = []
            for _ in range(repeats + 1):
                _sync(x)
                t0 = time.perf_counter()
                out = self._member_logits(x, name)
                if params:
                    torch.autograd.grad(out.float().sum(), params, allow_unused=True)
                _sync(x)
                runs.append(time.perf_counter() - t0)
            times[name] = sorted(runs[1:])[len(runs[1:]) // 2]
        self._tuned[x.device.type] = min(times, key=times.__getitem__)
        return times

    def _member_logits(self, x: Tensor, path: str) -> Tensor:
        if path == "stacked":
            params, buffers = self.stacked_state()
            return self.functional_logits(params, buffers, x)
        return torch.stack([m(x) for m in self.members])

    def member_logits(self, x: Tensor) -> Tensor:
        """Each member's logits, [M, B, K], for ``x`` [B, *in_shape]."""
        check_shape(x, self.in_shape, model_input_spec(self.members[0])[1])
        return self._member_logits(x, self.resolve_path(x))

    def forward(self, x: Tensor) -> Tensor:
        """Log of the mean member softmax, [B, K] (usable as logits)."""
        return mean_log_softmax(self.member_logits(x))

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Ensemble class [B]: argmax of the mean member softmax; ``x`` in [0, 1]."""
        check_range(x)
        return self(x).argmax(-1)

    @torch.no_grad()
    def vote(self, x: Tensor) -> Tensor:
        """Majority vote of the members' argmax classes [B]; ties go to the class with the
        higher mean softmax. ``x`` in [0, 1]."""
        check_range(x)
        return majority_vote(self.member_logits(x))

    # ------------------------------------------------------------------ persistence
    def description(self) -> dict[str, Any]:
        """JSON-able description: format, package version, member specs, training config."""
        specs = []
        for i, m in enumerate(self.members):
            if not isinstance(m, Member):
                raise EnsdivError(f"member {i} ({type(m).__name__}) is not an ensdiv model, so "
                                  "it cannot be saved; build members with "
                                  "ensdiv.models.build_model")
            specs.append(m.spec)
        return {"format": FORMAT, "version": __version__, "num_members": self.num_members,
                "members": specs, "path": self.path, "config": self.config}

    def save(self, path: str | os.PathLike) -> None:
        """Write weights and description to ``path`` atomically (one torch file, weights-only
        loadable).

        Example:
            >>> import tempfile, os
            >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10)
            >>> p = os.path.join(tempfile.mkdtemp(), "ens.pt"); ens.save(p)
            >>> Ensemble.load(p).num_members
            2
        """
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        atomic_torch_save({"description": self.description(), "state_dict": state}, path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Ensemble:
        """Rebuild an ensemble saved by :meth:`save`; predictions are reproduced exactly. A
        ``map_location`` this machine does not have is one :class:`EnsdivError`."""
        where = torch.device(map_location)
        if where.type == "cuda" and not torch.cuda.is_available():
            raise EnsdivError(f"map_location {map_location}: this machine has no usable CUDA "
                              "GPU; load with map_location='cpu'")
        blob = read_ensemble_file(path)
        desc = blob["description"]
        fix, run = _repair(path)
        try:
            members = [build_model(**spec) for spec in desc["members"]]
            ens = cls(members, path=desc.get("path", "auto"), config=desc.get("config"))
            ens.load_state_dict(blob["state_dict"])
        except (EnsdivError, KeyError, TypeError, RuntimeError) as e:
            raise EnsdivError(f"{path} holds an ensemble description that does not match its "
                              f"weights ({first_sentence(e)}); {fix}",
                              remedy="retrain" if run else None, folder=run) from None
        return ens.to(map_location).eval()


def _repair(path: str | os.PathLike) -> tuple[str, str | None]:
    """What to do about a damaged ensemble file, and the run folder whose checkpoint can
    rebuild it (resuming its training), if any."""
    run = Path(path).parent
    if (run / "checkpoint.pt").exists():
        return f"restore it, or rebuild it from the checkpoint of the run in {run} by resuming " \
               "that run", str(run)
    return "restore it, or save the ensemble again", None


def read_ensemble_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by :meth:`Ensemble.save` (``{"description", "state_dict"}``) onto
    the CPU; a missing, damaged or foreign file is one :class:`EnsdivError`."""
    fix, run = _repair(path)
    remedy = "retrain" if run else None
    try:
        blob = read_torch(path, what="ensdiv ensemble file", fix=fix,
                          required=("description", "state_dict"))
    except EnsdivError as e:  # the same message, with the run that can rebuild the file
        raise EnsdivError(str(e), remedy=remedy, folder=run) from None
    desc = blob["description"]
    if not isinstance(desc, dict) or desc.get("format") != FORMAT \
            or not isinstance(desc.get("members"), list):
        raise EnsdivError(f"{path} is not an ensdiv ensemble file (format {FORMAT}); {fix}",
                          remedy=remedy, folder=run)
    return blob


def as_ensemble(model: nn.Module) -> Ensemble:
    """``model`` itself if it is an :class:`Ensemble`, else ``model`` wrapped as a one-member
    ensemble (so per-member functions such as input gradients work on a single network).

    Example:
        >>> as_ensemble(nn.Linear(4, 3)).num_members
        1
    """
    if isinstance(model, Ensemble):
        return model
    if not isinstance(model, nn.Module):
        raise EnsdivError(f"expected an Ensemble or a torch.nn.Module; got "
                          f"{type(model).__name__}")
    return Ensemble([model])


def _common_spec(members: Sequence[nn.Module]) -> tuple[tuple[int, ...] | None, int | None]:
    """The input shape and class count every member declares (None where none declares it);
    members that disagree cannot form an ensemble."""
    shapes = {tuple(m.in_shape) for m in members if getattr(m, "in_shape", None) is not None}
    classes = {int(m.num_classes) for m in members
               if getattr(m, "num_classes", None) is not None}
    if len(shapes) > 1:
        raise EnsdivError(f"members take different input shapes {sorted(shapes)}; an ensemble "
                          "needs one")
    if len(classes) > 1:
        raise EnsdivError(f"members predict different numbers of classes {sorted(classes)}; an "
                          "ensemble needs one")
    return (next(iter(shapes)) if shapes else None), (next(iter(classes)) if classes else None)


def _sync(x: Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def weights_fingerprint(ensemble: nn.Module) -> str:
    """A short hash (16 hex digits) of the ensemble's weights (names and bytes of its state
    dict): what a detector's threshold, a card or a certificate belongs to.

    Example:
        >>> ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
        >>> len(weights_fingerprint(ens))
        16
    """
    h = hashlib.sha256()
    for k, v in sorted(ensemble.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
