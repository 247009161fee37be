import json
import math

import numpy as np
import pytest
from scipy import stats

from ensdiv.errors import EnsdivError
from ensdiv.runs.plots import plot_gdr_vs_attack, plot_transfer_heatmaps
from ensdiv.sweep_stats import correlations


def fake_records(n=6, seed=0):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        g = 0.03 + 0.03 * i
        attacks = []
        for eps in (0.03, 0.09):
            rate = min(1.0, g * eps * 40 + rng.uniform(0, 0.01))
            fooled = int(rate * 200)
            mat = [[1.0, rate], [rate, 1.0]]
            attacks.append({
                "attack": "fgsm", "eps": eps, "steps": 1,
                "whitebox": {"rate": fooled / 200, "fooled": fooled, "total": 200},
                "blackbox": {"rate": fooled / 400, "fooled": fooled // 2, "total": 200},
                "transfer_mean": rate,
                "transfer": {"matrix": mat, "fooled": [[200, fooled], [fooled, 200]],
                             "total": [[200, 200], [200, 200]]}})
        recs.append({"lam": float(i), "seed": 0, "gdr": g, "n": 200, "ensemble_acc": 0.9,
                     "attacks": attacks})
    return recs


def test_correlations_match_scipy():
    recs = fake_records()
    rows = correlations(recs)
    assert len(rows) == 2 * 3
    row = next(r for r in rows if r["eps"] == 0.03 and r["measure"] == "whitebox")
    g = [r["gdr"] for r in recs]
    s = [r["attacks"][0]["whitebox"]["rate"] for r in recs]
    assert row["rho"] == pytest.approx(stats.spearmanr(g, s).statistic)
    assert row["n"] == 6 and row["rho"] > 0.9


def test_constant_series_gives_nan_not_error():
    recs = fake_records(n=2)
    assert all(math.isnan(r["rho"]) for r in correlations(recs))


def test_figures_written(tmp_path):
    recs = fake_records()
    rows = plot_gdr_vs_attack(recs, tmp_path / "a.png")
    assert (tmp_path / "a.png").stat().st_size > 10_000 and len(rows) == 6
    high, low = plot_transfer_heatmaps(recs, tmp_path / "b.png", attack="fgsm")
    assert high["gdr"] == max(r["gdr"] for r in recs) and low["gdr"] == min(
        r["gdr"] for r in recs)
    with pytest.raises(ValueError, match="no pgd"):
        plot_transfer_heatmaps(recs, tmp_path / "c.png", attack="pgd")


def test_null_values_from_strict_json_are_left_out(tmp_path):
    import json

    from ensdiv.errors import EnsdivError
    from ensdiv.io import atomic_write_jsonl, read_jsonl
    from ensdiv.runs.plots import check_plot_options

    recs = fake_records()
    recs[0]["gdr"] = float("nan")  # every sample excluded
    recs[1]["attacks"][0]["transfer_mean"] = float("nan")  # no input counted
    recs[1]["attacks"][0]["transfer"]["matrix"][0][1] = float("nan")
    atomic_write_jsonl(tmp_path / "r.jsonl", recs)
    back = read_jsonl(tmp_path / "r.jsonl")
    assert back[0]["gdr"] is None and "NaN" not in (tmp_path / "r.jsonl").read_text()
    rows = correlations(back)
    row = next(r for r in rows if r["eps"] == 0.03 and r["measure"] == "transfer")
    assert row["n"] == 4  # records 0 (no GDR) and 1 (no transfer rate) left out
    assert next(r for r in rows if r["eps"] == 0.03 and r["measure"] == "whitebox")["n"] == 5
    plot_gdr_vs_attack(back, tmp_path / "a.png")
    plot_transfer_heatmaps(back, tmp_path / "b.png", attack="fgsm", eps=0.03)
    assert check_plot_options(back, attack=None, eps=None) == ("fgsm", 0.09)
    with pytest.raises(EnsdivError, match="no record has a defined GDR"):
        check_plot_options([{**r, "gdr": None} for r in back], attack="fgsm", eps=None)
    assert json.loads(json.dumps(back)) == back


def _card(div, lam, seed, *, sigma=0.0, n=500, eps=0.1, clean=0.95, robust=0.3, transfer=0.2):
    from ensdiv.card import Card
    ev = {"aggregation": "softmax", "clean_acc": clean, "robust_acc": robust,
          "averaged_output_robust_acc": robust}
    return Card(name=f"{div}-s{seed}", run=f"runs/{div}-s{seed}", dataset="mnist5k", eps=eps,
                n=n, aggregation="softmax", clean_acc=clean, robust_acc=robust,
                robust_acc_se=0.02, evaluations=[ev], transfer={"mean": transfer},
                training={"diversity": div, "lam": lam, "seed": seed, "noise_sigma": sigma})


def test_the_methods_figure_has_one_point_per_seed_and_one_colour_per_method(tmp_path):
    from ensdiv.runs.plots import plot_methods
    cards = [_card("none", 0.0, s) for s in range(3)] + \
        [_card("gal", 2.0, s, transfer=0.05) for s in range(3)] + \
        [_card("drt", 0.5, s, sigma=0.25, robust=0.6) for s in range(2)]
    drawn = plot_methods(cards, tmp_path / "m.png")
    assert drawn == {"plain": 3, "gal λ = 2": 3, "drt λ = 0.5, σ = 0.25": 2}
    assert list(drawn) == ["plain", "gal λ = 2", "drt λ = 0.5, σ = 0.25"]  # ensdiv's order
    assert (tmp_path / "m.png").stat().st_size > 10_000
    with pytest.raises(EnsdivError, match="one figure compares cards of one setting"):
        plot_methods(cards + [_card("gal", 2.0, 9, eps=0.05)], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_methods_from_card_folders(tmp_path, capsys):
    from ensdiv.cli import main
    folders = []
    for c in (_card("none", 0.0, 0), _card("gal", 2.0, 0, transfer=0.05)):
        folder = tmp_path / c.name
        folder.mkdir()
        (folder / "card.json").write_text(json.dumps(c.to_dict()))
        folders.append(str(folder))
    assert main(["plot", "methods", *folders, "--out-dir", str(tmp_path / "f"), "--table"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "f" / "methods.png").exists() and "| gal λ = 2 | 1 |" in out
