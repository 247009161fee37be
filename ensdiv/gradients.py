"""Per-member, per-sample input gradients with torch.func, differentiable for double backprop.

Gradient-diversity training (Kariyappa & Qureshi 2019, GAL; Adam & Speciel 2020, GDR) needs,
for every member m and sample b, the input gradient g[m, b] = ∇ₓ ℓ_m(x_b) — and, to regularize
it, the derivative of a function of g with respect to the members' parameters (second order).

Members never couple samples (no train-mode BatchNorm), so the gradient of the loss *summed* over
the batch with respect to the input batch is already the per-sample gradient: one backward per
member, no ``vmap`` over samples needed.

Two paths, the same numbers (tested against a loop of ``torch.autograd.grad(create_graph=True)``):

- stacked: ``vmap`` over the members' stacked parameters of ``torch.func.grad_and_value`` of a
  ``functional_call`` — no Python loop over members (same-architecture ensembles);
- loop: ``torch.func.grad_and_value`` per member module (heterogeneous ensembles, and the
  faster path on CPU, where ``Ensemble.resolve_path`` picks it by measurement).

Example:
    >>> import torch
    >>> from ensdiv.ensemble import Ensemble
    >>> ens = Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10)
    >>> input_gradients(ens, torch.rand(4, 1, 8, 8), torch.arange(4)).shape
    torch.Size([3, 4, 1, 8, 8])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from ensdiv.ensemble import Ensemble, as_ensemble
from ensdiv.errors import check_batch, check_choice, check_input

# names the command line also needs, defined torch-free in ensdiv.vocab; re-exported
from ensdiv.vocab import GRAD_MODES as GRAD_MODES
from ensdiv.vocab import GradMode as GradMode


def runner_up(ensemble: Ensemble, x: Tensor, y: Tensor) -> Tensor:
    """The ensemble's most likely wrong class per sample [B] (mean softmax with y masked)."""
    with torch.no_grad():
        logp = ensemble(x)
        return logp.scatter(1, y[:, None], float("-inf")).argmax(1)


def _objective(mode: str, target: Tensor | None, y: Tensor) -> Callable[[Tensor], Tensor]:
    """Per-member scalar objective of the member's logits, summed over the batch."""
    if mode == "loss":
        return lambda logits: nn.functional.cross_entropy(logits, y, reduction="sum")
    # margin toward the common wrong class: rises as the member moves toward being fooled
    return lambda logits: (logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])).sum()


def members_grad_and_value(ensemble: Ensemble, x: Tensor, y: Tensor, *, mode: str = "loss",
                           create_graph: bool = False) -> tuple[Tensor, Tensor]:
    """Input gradients [M, B, ...] and per-member objective sums [M] from one pass per member.

    The objective of member m is Σ_b CE(f_m(x_b), y_b) (``mode="loss"``) or
    Σ_b f_m(x_b)[t_b] − f_m(x_b)[y_b] with t the ensemble's runner-up (``mode="margin"``).
    With ``create_graph=True`` both results are differentiable with respect to the members'
    parameters; otherwise they are detached.
    """
    check_choice("gradient mode", mode, GRAD_MODES)
    target = runner_up(ensemble, x, y) if mode == "margin" else None
    objective = _objective(mode, target, y)
    x = x.detach()
    with torch.enable_grad() if create_graph else torch.no_grad():
        if ensemble.resolve_path(x) == "stacked":
            params, buffers = ensemble.stacked_state()
            skeleton = ensemble.skeleton()

            def member(p: dict[str, Tensor], b: dict[str, Tensor], xx: Tensor) -> Tensor:
                return objective(functional_call(skeleton, (p, b), (xx,)))

            grads, values = vmap(grad_and_value(member, argnums=2), in_dims=(0, 0, None),
                                 randomness="different")(params, buffers, x)
        else:
            outs = [grad_and_value(lambda xx, mod=mod: objective(mod(xx)))(x)
                    for mod in ensemble.members]
            grads = torch.stack([g for g, _ in outs])
            values = torch.stack([v for _, v in outs])
    if not create_graph:
        grads, values = grads.detach(), values.detach()
    return grads, values


def input_gradients(ensemble: Ensemble, x: Tensor, y: Tensor, *, create_graph: bool = False,
                    mode: str = "loss") -> Tensor:
    """Each member's per-sample input gradient, [M, B, *x.shape[1:]].

    Args:
        ensemble: M members (any mode; dropout, if any, draws independently per member). Any
            other ``nn.Module`` is treated as a one-member ensemble (M = 1).
        x: inputs [B, C, H, W] in [0, 1], of the members' input shape and dtype.
        y: integer labels [B].
        create_graph: keep the graph so a loss of the gradients can be backpropagated to the
            members' parameters (double backprop, as GAL/GDR training needs).
        mode: ``"loss"`` — gradient of each member's cross-entropy (Kariyappa & Qureshi 2019);
            ``"margin"`` — gradient of the margin toward one common wrong class, the ensemble's
            runner-up (members "fooled in the same way", Adam & Speciel 2020).

    Example:
        >>> import torch
        >>> from ensdiv.ensemble import Ensemble
        >>> ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10)
        >>> g = input_gradients(ens, torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2]))
        >>> g.shape, g.requires_grad
        (torch.Size([2, 3, 1, 8, 8]), False)
    """
    ensemble = as_ensemble(ensemble)
    check_input(ensemble, x, y)
    if ensemble.num_classes is None and x.shape[0] > 0:  # undeclared: ask the model
        with torch.no_grad():
            check_batch(x, y, num_classes=ensemble.members[0](x[:1]).shape[-1])
    grads, _ = members_grad_and_value(ensemble, x, y, mode=mode, create_graph=create_graph)
    return grads
