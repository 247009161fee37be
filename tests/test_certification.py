"""ensdiv.certification: Cohen et al.'s certify loop over a data set, resumable."""

import pytest
import torch
from torch.utils.data import TensorDataset

from ensdiv.certification import certify_dataset
from ensdiv.ensemble import Ensemble


@pytest.fixture(scope="module")
def ens():
    return Ensemble.build("mlp", 3, in_shape=(1, 8, 8), num_classes=10, seed=0).eval()


def data(n=8):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10)


def test_records_resume_after_a_torn_line_and_match_an_uninterrupted_run(ens, tmp_path):
    kw = dict(sigma=0.25, n0=10, n=200, alpha=0.01, batch_size=64, progress=False)
    full = certify_dataset(ens, data(), out=tmp_path / "a.jsonl", **kw)
    assert [r["idx"] for r in full] == list(range(8))
    for r in full:
        assert r["samples"] == 210 and r["correct"] == (r["predict"] == r["label"])
        assert (r["predict"] == -1) == (r["radius"] == 0.0)
    lines = (tmp_path / "a.jsonl").read_text().splitlines()
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # killed
    again = certify_dataset(ens, data(), out=tmp_path / "b.jsonl", **kw)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in full]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == strip
    # another skip/max certifies the same examples the same way (noise seeded per example)
    some = certify_dataset(ens, data(), out=tmp_path / "c.jsonl", skip=2, max=3, **kw)
    assert [r["idx"] for r in some] == [0, 2, 4]
    assert [r["radius"] for r in some] == [full[i]["radius"] for i in (0, 2, 4)]


def test_radius_mode_counts_samples(ens, tmp_path):
    recs = certify_dataset(ens, data(4), sigma=0.25, n0=10, n=1, alpha=0.01, batch_size=100,
                           out=tmp_path / "r.jsonl", radius=0.1, stages=(100, 1_000),
                           progress=False)
    for r in recs:
        assert r["radius"] in (0.0, 0.1) and 110 <= r["samples"] <= 1_110
