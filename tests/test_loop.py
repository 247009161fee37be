"""The training loop: divergence, read-backs."""

import functools

import pytest
import torch

from ensdiv.ensemble import Ensemble
from ensdiv.loop import CHECKPOINT, fit


def test_non_finite_loss_stops_with_the_epoch_and_parts(tmp_path):
    from ensdiv.data import load_dataset
    from ensdiv.objective import ce_loss
    from ensdiv.training import TrainingDiverged, fit

    train, test, info = load_dataset("digits")
    ens = Ensemble.build("mlp", 2, in_shape=info.in_shape, num_classes=10)
    calls = []

    def explode(e, x, y):
        calls.append(1)
        loss, stats = ce_loss(e, x, y)
        if len(calls) > 14:  # epoch 2 (12 batches per epoch), batch 3
            return loss * float("nan"), {**stats, "ce_1": float("nan")}
        return loss, stats

    with pytest.raises(TrainingDiverged) as err:
        fit(ens, train, test, epochs=3, batch_size=128, lr=1e-3, seed=0, loss_fn=explode,
            out_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "epoch 2, batch 3" in msg and "ce_1=nan" in msg
    assert "keeps epoch 1" in msg
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["epoch"] == 1


def _reads_back(monkeypatch, calls):
    """Count where ensdiv's own code brings a tensor's value back to Python (each a GPU sync
    on CUDA); torch's optimizer and data loader read host-side tensors and are not counted."""
    import sys

    for name in ("__float__", "__bool__", "__int__", "item", "tolist"):
        orig = getattr(torch.Tensor, name)

        def wrapped(self, *a, _orig=orig, _name=name):
            caller = sys._getframe(1).f_code.co_filename
            if "/ensdiv/" in caller:
                calls.append((_name, caller, sys._getframe(1).f_lineno))
            return _orig(self, *a)

        monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("diversity", ["none", "gal"])
def test_fit_reads_nothing_back_per_batch_between_sync_points(monkeypatch, diversity):
    """The hot loop keeps loss and stats on the device: with the GPU policy (read back every
    SYNC_EVERY batches) the number of read-backs per epoch does not grow with the batches."""
    from torch.utils.data import TensorDataset

    from ensdiv import loop as train_mod
    from ensdiv.objective import ensemble_loss

    monkeypatch.setattr(train_mod, "_sync_every", lambda device: 10_000)
    loss_fn = functools.partial(ensemble_loss, diversity=diversity, lam=0.5)
    counts = []
    for n_batches in (3, 9):
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.rand(8 * n_batches, 1, 8, 8, generator=g),
                             torch.randint(0, 10, (8 * n_batches,), generator=g))
        test = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))
        ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
        calls = []
        with monkeypatch.context() as mp:
            _reads_back(mp, calls)
            fit(ens, data, test, epochs=1, batch_size=8, lr=1e-3, seed=0, progress=False,
                loss_fn=loss_fn)
        counts.append(len(calls))
    assert counts[0] == counts[1], counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_and_certification_do_not_synchronize_per_batch():
    """torch.cuda.set_sync_debug_mode counts synchronizing calls: one training epoch and one
    sample_counts call make as many with 3 batches as with 9."""
    import warnings

    from torch.utils.data import TensorDataset

    from ensdiv import loop as train_mod
    from ensdiv.smoothing import Smooth

    def syncs(fn):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return len(caught)

    old = train_mod._sync_every
    train_mod._sync_every = lambda device: 10_000
    try:
        counts = []
        for n_batches in (3, 9):
            data = TensorDataset(torch.rand(8 * n_batches, 1, 8, 8),
                                 torch.randint(0, 10, (8 * n_batches,)))
            ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).cuda()
            counts.append(syncs(functools.partial(fit, ens, data, data, epochs=1, batch_size=8,
                                                  lr=1e-3, seed=0, progress=False)))
        assert counts[0] == counts[1], counts
    finally:
        train_mod._sync_every = old
    ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=0).cuda().eval()
    smooth = Smooth(ens, num_classes=10, sigma=0.5)
    x = torch.rand(1, 8, 8, device="cuda")
    assert syncs(lambda: smooth.sample_counts(x, 300, 100)) == \
        syncs(lambda: smooth.sample_counts(x, 900, 100))


def test_labels_out_of_range_stop_fit_with_one_line_before_any_step():
    from torch.utils.data import TensorDataset

    from ensdiv.errors import EnsdivError

    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
    before = [p.clone() for p in ens.parameters()]
    data = TensorDataset(torch.rand(20, 1, 8, 8), torch.arange(20) % 12)  # labels up to 11
    with pytest.raises(EnsdivError, match=r"labels must lie in \[0, 10\)"):
        fit(ens, data, data, epochs=1, batch_size=8, lr=1e-3, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, ens.parameters(), strict=True))


def test_without_a_terminal_progress_comes_as_plain_lines(monkeypatch, capsys):
    from torch.utils.data import TensorDataset

    from ensdiv import loop

    monkeypatch.setattr(loop, "PROGRESS_EVERY", 0.0)  # every batch, for the test
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=0)
    data = TensorDataset(torch.rand(24, 1, 8, 8), torch.arange(24) % 10)
    fit(ens, data, data, epochs=1, batch_size=8, lr=1e-3, seed=0, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("epoch")]
    assert lines and lines[-1].startswith("epoch 1/1: batch 3/3 (100%), loss ")
    fit(ens, data, data, epochs=1, batch_size=8, lr=1e-3, seed=0, progress=False)
    assert "batch" not in capsys.readouterr().err  # quiet means quiet
