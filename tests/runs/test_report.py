import math

import pytest

from ensdiv.runs.report import (
    correlation_table,
    lam_table,
    sweep_tables,
    transfer_fall_table,
)


def fake_record(lam, seed, transfer, first, white, pgd_alone, half, gdr):
    def entry(attack, eps, scale):
        e = {"attack": attack, "eps": eps, "transfer_mean": transfer * scale,
             "to_ensemble": {"rate": transfer * scale / 2},
             "blackbox": {"rate": 0.1, "total": 190},
             "transfer": {"fooled": [[0, 5], [5, 0]], "total": [[190, 190], [190, 190]]},
             "whitebox": {"rate": white * scale, "total": 190,
                          "attacks": {attack: {"rate": pgd_alone * scale}},
                          "half_budget": {"rate": half * scale}}}
        if attack == "pgd":
            e["transfer_mean_first_success"] = first * scale
        return e

    attacks = [entry(a, eps, eps / 0.09) for a in ("fgsm", "pgd") for eps in (0.03, 0.09)]
    return {"lam": lam, "seed": seed, "n": 200, "gdr": gdr, "mean_cos": 1 - gdr,
            "ensemble_acc": 0.95, "attacks": attacks, "warnings": [], "dataset": "mnist5k",
            "members": 3, "arch": "cnn", "epochs": 3}


RECORDS = [fake_record(0.0, 0, 0.25, 0.10, 0.50, 0.40, 0.45, 0.30),
           fake_record(0.0, 1, 0.27, 0.12, 0.52, 0.42, 0.47, 0.31),
           fake_record(3.0, 0, 0.02, 0.01, 0.70, 0.50, 0.66, 0.10),
           fake_record(3.0, 1, 0.03, 0.01, 0.74, 0.52, 0.70, 0.12)]


def test_lam_table_rows_come_from_the_records():
    text = lam_table(RECORDS)
    assert "L∞ eps = 0.09" in text and "n = 200" in text and "2 seeds" in text
    rows = {line.split(" | ")[0].strip("| *"): line for line in text.splitlines()
            if line.startswith("|")}
    assert "0.260 ± 0.010" in rows["member → member transfer, PGD, full budget"]
    assert "0.025 ± 0.005" in rows["member → member transfer, PGD, full budget"]
    assert "0.110 ± 0.010" in rows["member → member transfer, PGD, first-success examples"]
    assert "0.720 ± 0.020" in rows["white-box on ensemble, worst case PGD / APGD-CE / APGD-DLR"]
    assert "0.510 ± 0.010" in rows["white-box PGD alone, full budget"]
    assert "0.680 ± 0.020" in rows["white-box worst case at half the budget"]
    assert "| λ = 0 | λ = 3 |" in text
    low = lam_table(RECORDS, eps=0.03)
    assert "| member → member transfer, PGD, full budget | 0.087 ± 0.003 |" in low  # 0.26/3


def test_transfer_fall_uses_the_ratio_of_means_for_both_keep_rules():
    text = transfer_fall_table(RECORDS)
    full = next(ln for ln in text.splitlines() if ln.startswith("| PGD | 0.09 | full budget"))
    first = next(ln for ln in text.splitlines() if ln.startswith("| PGD | 0.09 | first"))
    assert full.endswith(f"| {0.26 / 0.025:.1f} |")
    assert first.endswith(f"| {0.11 / 0.01:.1f} |")
    assert "| FGSM | 0.03 | one step |" in text


def test_correlation_table_and_sweep_tables():
    corr = correlation_table(RECORDS)
    assert "n = 4 ensembles" in corr
    pgd_row = next(ln for ln in corr.splitlines() if ln.startswith("| PGD | 0.09"))
    # transfer falls with GDR, white-box success rises as GDR falls
    cells = [c.strip() for c in pgd_row.strip("|").split("|")]
    assert float(cells[2].split()[0]) < 0 < float(cells[3].split()[0])
    full = sweep_tables(RECORDS)
    assert full.startswith("**4 ensembles**, mnist5k, 3 × cnn, 3 epochs; 0 record(s)")
    assert "by eps" in full and lam_table(RECORDS) in full


def test_tables_without_pgd_or_with_undefined_values():
    no_pgd = [{**r, "attacks": [a for a in r["attacks"] if a["attack"] == "fgsm"]}
              for r in RECORDS]
    text = sweep_tables(no_pgd)
    assert "worst case PGD" not in text and "FGSM" in text
    hole = [{**r, "attacks": [{**a, "transfer_mean": math.nan} for a in r["attacks"]]}
            for r in RECORDS]
    assert "| — | — | — |" in transfer_fall_table(hole)


@pytest.mark.parametrize("bad", [[], [{"lam": 0.0}]])
def test_tables_need_records(bad):
    with pytest.raises((KeyError, IndexError, ValueError)):
        sweep_tables(bad)


def fake_detection(score, adversary, auroc, dra, lam=1.0):
    return {"score": score, "adversary": adversary, "auroc": auroc, "tpr": 0.5, "fpr": 0.04,
            "attack_success": 0.9, "robust_acc": 0.1, "detection_robust_acc": dra, "n": 100,
            "n_correct": 96, "n_success": 86, "clean_acc": 0.96, "fpr_target": 0.05,
            "n_calib": 100, "attack": {"eps": 0.3, "steps": 40}, "dataset": "mnist5k",
            "members": 3, "diversity": "gal", "lam": lam}


def test_detection_tables():
    from ensdiv.runs.report import detection_summary, detection_table

    recs = [fake_detection("mean_kl_to_mean", "whitebox", 0.98, 0.9),
            fake_detection("mean_kl_to_mean", "adaptive", None, 0.04)]
    text = detection_table(recs)
    assert "L∞ eps = 0.3, 40 steps, n = 100" in text and "5% FPR on 100" in text
    assert "| mean_kl_to_mean | white-box PGD, oblivious | 0.980 | 0.500 ± 0.054 |" in text
    assert "| 0.900 ± 0.030 |" in text  # binomial s.e. sqrt(.9 * .1 / 100)
    assert "| mean_kl_to_mean | **adaptive, worst of the two** | — |" in text
    summary = detection_summary([recs])
    assert "| gal λ = 1.0 | mean_kl_to_mean | 0.980 | 0.900 ± 0.030 | — | 0.040 ± 0.020 |" \
        in summary
    with pytest.raises(ValueError):
        detection_table([])


def test_records_of_two_regularizers_make_one_table():
    """A GDR sweep (with the plain baseline) and a GAL sweep (without) side by side: columns by
    (regularizer, λ), each regularizer's most diverse λ against the shared plain one."""
    gdr = [{**r, "trained_with": "none" if r["lam"] == 0 else "gdr"} for r in RECORDS]
    gal = [{**fake_record(1.0, s, 0.05, 0.02, 0.6, 0.45, 0.58, 0.15), "trained_with": "gal"}
           for s in (0, 1)]
    table = lam_table(gdr + gal)
    assert "| measure | λ = 0 | gdr λ = 3 | gal λ = 1 |" in table
    assert "| GDR | 0.305 ± 0.005 | 0.110 ± 0.010 | 0.150 ± 0.000 |" in table
    fall = transfer_fall_table(gdr + gal)
    assert fall.splitlines()[0] == ("| attack | eps | examples | λ = 0 | gdr λ = 3 | fall (×) | "
                                    "gal λ = 1 | fall (×) |")
    # PGD eps 0.09 full budget: plain mean 0.26, gdr mean 0.025 (fall 10.4), gal 0.05 (5.2)
    assert ("| PGD | 0.09 | full budget | 0.260 ± 0.010 | 0.025 ± 0.005 | 10.4 "
            "| 0.050 ± 0.000 | 5.2 |") in fall
    # one regularizer alone: the labels stay plain λ
    assert "| measure | λ = 0 | λ = 3 |" in lam_table(gdr)


def test_train_time_table_takes_the_median_per_group():
    from ensdiv.runs.report import train_time_table

    recs = [{"lam": 0.0, "seed": s, "train_seconds": t, "epochs": 3}
            for s, t in enumerate((828.4, 228.0, 231.0))]
    recs += [{"lam": 1.0, "seed": 0, "train_seconds": 700.0, "epochs": 3, "trained_with": "gdr"}]
    assert train_time_table(recs).splitlines() == [
        "| ensemble | n | median seconds (3 epochs) | range |", "|---|---|---|---|",
        "| λ = 0 | 3 | 231 | 228–828 |", "| λ = 1 | 1 | 700 | 700–700 |"]


def test_equal_gdr_table_measures_the_gap_between_regularizers():
    from ensdiv.runs.report import equal_gdr_table

    # log10 success is linear in GDR for both, GAL's line 10^0.1 ≈ 1.26× above GDR's: every
    # residual is ±0.05 around the pooled fit and the ratio is exactly 10^0.1
    def rec(reg, lam, g, seed):
        rate = 10 ** (-1 + 2 * g + (0.1 if reg == "gal" else 0.0))
        return {"lam": lam, "seed": seed, "trained_with": reg, "gdr": g,
                "attacks": [{"attack": "pgd", "eps": 0.09,
                             "whitebox": {"rate": rate, "total": 500}}]}

    recs = [rec(reg, lam, g, s) for reg in ("gdr", "gal") for lam, g in ((1, 0.1), (3, 0.05))
            for s in (0, 1)]
    lines = equal_gdr_table(recs, measures=("whitebox",)).splitlines()
    assert lines[0] == ("| attack | eps | measure | gdr residual | gal residual | "
                        "gal ÷ gdr at equal GDR |")
    assert lines[2] == (f"| PGD | 0.09 | white-box ensemble | -0.050 ± 0.000 | 0.050 ± 0.000 | "
                        f"{10 ** 0.1:.2f} |")
    # one regularizer (and the plain baseline): nothing to compare, and sweep_tables says nothing
    assert equal_gdr_table(RECORDS) == ""
    assert "equal GDR" not in sweep_tables(RECORDS)
    both = [{**r, "trained_with": "gdr"} for r in RECORDS[2:]] + \
        [{**r, "lam": 1.0, "trained_with": "gal"} for r in RECORDS[2:]]
    assert "Regularizers compared at equal GDR" in sweep_tables(RECORDS[:2] + both)


def test_arch_pair_table_differences_and_gate_against_scipy():
    """The candidate's difference of means and its standard error (independent seeds) against
    scipy's sem; the gate read as "no worse": accuracy at most 0.5 points lower, and for a GAL
    ensemble GDR and transfer at most one s.e. higher; a plain ensemble's diversity unmarked."""
    from scipy import stats

    from ensdiv.runs.report import arch_pair_table

    def rec(arch, seed, acc, gdr, transfer, lam=0.5):
        return {**fake_record(lam, seed, transfer, 0.1, 0.5, 0.4, 0.45, gdr), "arch": arch,
                "test_acc": acc, "trained_with": "gal" if lam else "none", "diversity": "gal"}

    ref = [rec("cnn", s, a, g, t) for s, (a, g, t) in enumerate(
        [(0.90, 0.20, 0.30), (0.92, 0.22, 0.34), (0.91, 0.21, 0.32)])]
    cand = [rec("cnn-nf", s, a, g, t) for s, (a, g, t) in enumerate(
        [(0.905, 0.30, 0.21), (0.915, 0.32, 0.23), (0.91, 0.34, 0.25)])]
    plain_ref = [rec("cnn", s, 0.95, 0.2, 0.3, lam=0.0) for s in range(2)]
    plain_cand = [rec("cnn-nf", s, 0.93 + 0.01 * s, 0.5, 0.6, lam=0.0) for s in range(2)]
    extra = [rec("cnn", 0, 0.9, 0.1, 0.2, lam=2.0)]  # no candidate at λ = 2: no rows
    table = arch_pair_table([("fmnist, 1 epoch", plain_ref + ref + extra, plain_cand + cand)],
                            attack="pgd", eps=0.09)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 3
    assert lines[2].startswith("| fmnist, 1 epoch | plain | cnn | 0.950 ± 0.000 |")
    assert lines[4] == "| | | difference | −0.015 ± 0.005 ✗ | +0.300 ± 0.000 | +0.300 ± 0.000 |"
    assert lines[5].startswith("| fmnist, 1 epoch | gal λ = 0.5 | cnn | 0.910 ± 0.006 |")
    assert lines[6].startswith("| | | cnn-nf | 0.910 ± 0.003 |")
    cells = [c.strip() for c in lines[7].split("|")[4:-1]]
    for cell, key in zip(cells, ("test_acc", "gdr", None), strict=True):
        def get(r, key=key):
            return r[key] if key else r["attacks"][3]["transfer_mean"]  # PGD, 0.09
        a, b = [get(r) for r in ref], [get(r) for r in cand]
        d = sum(b) / 3 - sum(a) / 3
        se = math.hypot(stats.sem(a), stats.sem(b))
        assert cell.startswith(f"{'−' if d < 0 else '+'}{abs(d):.3f} ± {se:.3f}")
    assert cells[0].endswith("✓")  # 0.000 apart
    assert cells[1].endswith("✗")  # GDR 0.11 higher (less diverse), s.e. ~0.01
    assert cells[2].endswith("✓")  # transfer 0.09 lower: more diverse, passes


def test_card_tables_keep_different_evaluations_of_one_run_apart():
    from ensdiv.card import Card
    from ensdiv.errors import EnsdivError
    from ensdiv.runs.report import card_table, method_table

    ev = {"aggregation": "softmax", "clean_acc": 0.9, "robust_acc": 0.2, "robust_acc_se": 0.02,
          "averaged_output_robust_acc": 0.3, "averaged_output_robust_acc_se": 0.02,
          "warnings": [], "surrogate": None, "attacks": {}}

    def card(n, apgd, run="runs/gal", seed=0):
        return Card(name="gal", dataset="mnist5k", eps=0.1, n=n, aggregation="softmax",
                    clean_acc=0.9, robust_acc=0.2, robust_acc_se=0.02, evaluations=[ev],
                    run=run, budget={"apgd_steps": apgd}, transfer={"mean": 0.1},
                    training={"diversity": "gal", "lam": 0.5, "seed": seed})

    rows = card_table([card(500, 100), card(100, 10)]).splitlines()[2:]
    assert rows[0].startswith("| gal (n 500, APGD 100") and rows[1].startswith("| gal (n 100")
    with pytest.raises(EnsdivError, match="mix .*n 100.*n 500.*one table per setting"):
        method_table([card(500, 100), card(100, 100, run="runs/gal-s1", seed=1)])
    with pytest.raises(EnsdivError, match="runs/gal is carded more than once"):
        method_table([card(500, 100), card(500, 100)])
    assert "| gal λ = 0.5 | 2 |" in method_table([card(500, 100),
                                                  card(500, 100, run="runs/gal-s1", seed=1)])
