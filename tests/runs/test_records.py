"""ensdiv.runs.records: reading the records runs leave."""

import shlex

import pytest

from ensdiv.errors import EnsdivError
from ensdiv.io import atomic_write_json


def test_missing_sweep_records_name_the_folder_given(tmp_path):
    from ensdiv.runs.records import read_sweep_records
    with pytest.raises(EnsdivError, match=f"--out {tmp_path / 'none'}` first"):
        read_sweep_records(tmp_path / "none")


def test_the_commands_records_suggest_are_shell_quoted(tmp_path):
    from ensdiv.runs.records import (
        read_certification,
        read_detection_records,
        read_sweep_records,
    )
    odd = tmp_path / "my runs" / "it's"  # a space and a quote: one word each, pasted back
    for read, command in ((read_sweep_records, "ensdiv sweep --out"),
                          (read_detection_records, "ensdiv detect RUN --out"),
                          (read_certification, "ensdiv certify RUN --out")):
        with pytest.raises(EnsdivError) as e:
            read(odd)
        suggested = str(e.value).split("`")[1]
        assert suggested.startswith(command) and shlex.split(suggested)[-1] == str(odd)


def test_training_records_read_config_and_last_epoch(tmp_path):
    from ensdiv.io import atomic_write_jsonl
    from ensdiv.runs.records import training_records
    from ensdiv.runs.report import arch_pair_table
    from ensdiv.runs.rundir import CONFIG
    from ensdiv.training import TrainConfig

    runs = []
    for arch, seed, acc in [("cnn", 0, 0.90), ("cnn", 1, 0.91), ("cnn-nf", 0, 0.88),
                            ("cnn-nf", 1, 0.89)]:
        run = tmp_path / f"{arch}-{seed}"
        run.mkdir()
        atomic_write_json(run / CONFIG, TrainConfig(arch=arch, seed=seed, epochs=2).to_dict())
        atomic_write_jsonl(run / "metrics.jsonl", [
            {"epoch": 1, "ensemble_acc": 0.5, "member_acc": [0.5], "n": 360},
            {"epoch": 2, "ensemble_acc": acc, "member_acc": [acc], "n": 360}])
        runs.append(run)
    recs = training_records(runs)
    assert recs[1] == {"arch": "cnn", "dataset": "digits", "lam": 0.0, "seed": 1,
                       "trained_with": "none", "epochs": 2, "test_acc": 0.91,
                       "test_member_acc": [0.91], "test_n": 360}
    row = arch_pair_table([("digits", recs[:2], recs[2:])]).splitlines()[-1]
    assert row == "| | | difference | −0.020 ± 0.007 ✗ | — | — |"
    (runs[0] / "metrics.jsonl").unlink()
    with pytest.raises(EnsdivError, match="has no finished epoch; finish it with"):
        training_records(runs)
