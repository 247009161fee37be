"""ensdiv's attacks against torchattacks at equal settings, as the README's markdown table.

A digits MLP (15 epochs of Adam, seed 0) is attacked on the test images it classifies
correctly; each row is the success rate of both libraries' attack with the same eps, steps and
restarts (random starts differ between the libraries; PGD is averaged over 3 seeds).

    python benchmarks/attack_agreement.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchattacks

from ensdiv.attacks import apgd, fgsm, mifgsm, pgd, square
from ensdiv.data import load_dataset
from ensdiv.models import build_model


def digits_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The test suite's digits MLP and its correctly classified test images."""
    torch.manual_seed(0)
    train, test, _ = load_dataset("digits", seed=0)
    xtr, ytr = train.tensors
    model = build_model("mlp", in_shape=(1, 8, 8), num_classes=10, mean=(xtr.mean().item(),),
                        std=(xtr.std().item(),))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(15):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xte, yte = test.tensors
    with torch.no_grad():
        keep = model(xte).argmax(1) == yte
    return model, xte[keep], yte[keep]


def main() -> None:
    model, x, y = digits_mlp()

    def rate(x_adv: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(x_adv).argmax(1) != y).float().mean())

    def pgd_ours(eps: float, steps: int, norm: str) -> float:
        return sum(rate(pgd(model, x, y, eps=eps, steps=steps, norm=norm,
                            generator=torch.Generator().manual_seed(s))) for s in range(3)) / 3

    def pgd_theirs(eps: float, steps: int, norm: str) -> float:
        out = []
        for s in range(3):
            torch.manual_seed(100 + s)
            cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
            out.append(rate(cls(model, eps=eps, alpha=2.5 * eps / steps, steps=steps)(x, y)))
        return sum(out) / 3

    rows = [("FGSM", "L∞ 0.1", rate(fgsm(model, x, y, eps=0.1)),
             rate(torchattacks.FGSM(model, eps=0.1)(x, y))),
            ("PGD, 10 steps, mean of 3 starts", "L∞ 0.1", pgd_ours(0.1, 10, "linf"),
             pgd_theirs(0.1, 10, "linf")),
            ("PGD, 10 steps, mean of 3 starts", "L2 0.6", pgd_ours(0.6, 10, "l2"),
             pgd_theirs(0.6, 10, "l2")),
            ("MI-FGSM, 10 steps, decay 1", "L∞ 0.1", rate(mifgsm(model, x, y, eps=0.1, steps=10)),
             rate(torchattacks.MIFGSM(model, eps=0.1, alpha=0.01, steps=10, decay=1.0)(x, y)))]
    for loss in ("ce", "dlr"):
        for norm, eps in (("linf", 0.1), ("l2", 0.6)):
            for steps in (25, 100):
                ta = torchattacks.APGD(model, norm="Linf" if norm == "linf" else "L2", eps=eps,
                                       steps=steps, n_restarts=1, seed=0, loss=loss)
                rows.append((f"APGD-{loss.upper()}, {steps} steps",
                             f"{'L∞' if norm == 'linf' else 'L2'} {eps:g}",
                             rate(apgd(model, x, y, eps=eps, norm=norm, loss=loss, steps=steps)),
                             rate(ta(x, y))))
    for queries in (300, 1000):
        rows.append((f"Square, {queries} queries, mean of 3 seeds", "L∞ 0.1",
                     sum(rate(square(model, x, y, eps=0.1, queries=queries, seed=s))
                         for s in range(3)) / 3,
                     sum(rate(torchattacks.Square(model, eps=0.1, n_queries=queries,
                                                  seed=s)(x, y)) for s in range(3)) / 3))
    print(f"Digits MLP, {len(y)} correctly classified test images; success rate "
          f"(torch {torch.__version__}, torchattacks {torchattacks.__version__}).\n")
    print("| attack | ball | ensdiv | torchattacks |\n|---|---|---|---|")
    for name, ball, ours, theirs in rows:
        print(f"| {name} | {ball} | {ours:.3f} | {theirs:.3f} |")


if __name__ == "__main__":
    main()
