"""ensdiv.distributed: 1 vs 2 gloo processes on CPU give the same run."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import TensorDataset

from ensdiv import distributed
from ensdiv.ensemble import Ensemble


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(100, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (100,), generator=g)
    return TensorDataset(x[:70], y[:70]), TensorDataset(x[70:], y[70:])


def _fit(out_file, diversity):
    """Train on the synthetic data (global batch 16: the last batch of 6 splits 3 + 3), in
    float64 and on one thread per process (see the test for why)."""
    import functools

    from ensdiv.augment import gaussian_noise
    from ensdiv.loop import fit
    from ensdiv.objective import ensemble_loss

    torch.set_num_threads(1)
    train, test = _data(torch.float64)
    ens = Ensemble.build("cnn", 2, in_shape=(1, 8, 8), num_classes=10, seed=3).double()
    records = fit(ens, train, test, epochs=2, batch_size=16, lr=3e-3, seed=1, progress=False,
                  loss_fn=functools.partial(ensemble_loss, diversity=diversity, lam=0.5),
                  augment=gaussian_noise(0.1))
    if distributed.rank_and_world()[0] == 0:
        state = {k: v.tolist() for k, v in ens.state_dict().items()}
        Path(out_file).write_text(json.dumps({"records": records, "state": state}))


def _worker(rank, world, port, out_file, diversity):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    distributed.init_from_env(torch.device("cpu"))
    try:
        _fit(out_file, diversity)
    finally:
        distributed.shutdown()


LR, STEPS = 3e-3, 2 * 5  # _fit: 2 epochs of ceil(70 / 16) = 5 Adam steps
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which fit uses
# What legitimately differs between one process and two: the order in which a batch's per-sample
# gradients are summed (all-reduce of two half-batch sums vs one sum). In float64 that moves a
# gradient component by at most a few units of 2^-52 times the size of the summands (|g| < 10
# here): ~1e-15. Adam's step lr · m / (√v + eps) turns an absolute gradient difference d into at
# most lr · d / eps per step (the worst case: a component whose gradient is itself round-off,
# where eps dominates the denominator; in float32 the same bound is lr · 1e-6 / 1e-8 = 100 lr,
# i.e. any step at all, which is why this test runs in float64). Over STEPS steps:
WEIGHT_ATOL = 3 * STEPS * LR * 1e-15 / ADAM_EPS  # ≈ 9e-9; ×3 for the steps feeding back
# Records keep 6 significant digits (round_floats): two runs whose values agree to 1e-12 can
# still round one unit apart in the 6th digit.
RECORD_REL = 1e-5


@pytest.mark.parametrize("diversity", ["none", "gal"])
def test_two_processes_train_the_single_process_run(tmp_path, diversity):
    single = tmp_path / "single.json"
    _fit(single, diversity)
    double = tmp_path / "double.json"
    mp.spawn(_worker, args=(2, _free_port(), str(double), diversity), nprocs=2, join=True)
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    for ra, rb in zip(a["records"], b["records"], strict=True):
        assert rb["n"] == ra["n"] == 30
        # a prediction flips only where two logits tie within the weights' ~1e-8 difference
        assert rb["member_acc"] == ra["member_acc"]
        for k in ra:
            if k == "loss" or k.startswith("ce_") or k in ("reg", "train_cos"):
                assert rb[k] == pytest.approx(ra[k], rel=RECORD_REL, abs=1e-12), k
    for k, v in a["state"].items():
        torch.testing.assert_close(torch.tensor(b["state"][k], dtype=torch.float64),
                                   torch.tensor(v, dtype=torch.float64),
                                   rtol=0, atol=WEIGHT_ATOL)


def _late_import_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    distributed.init_from_env(torch.device("cpu"))
    import importlib

    importlib.import_module("torchvision")  # imports torch._dynamo, as ensdiv.data does
    distributed.all_reduce_sum(torch.ones(3))
    distributed.shutdown()
    names = [Path(f"/proc/self/task/{t}/comm").read_text().strip()
             for t in os.listdir("/proc/self/task")]
    Path(out_dir, f"threads{rank}.json").write_text(json.dumps(names))


@pytest.mark.skipif(sys.platform != "linux", reason="threads listed from /proc")
def test_shutdown_stops_gloos_threads_even_after_a_late_torchvision_import(tmp_path):
    """A gloo thread left running past shutdown aborts the interpreter at exit (SIGABRT) in
    some runs: modules imported after the group exists must not keep it alive."""
    mp.spawn(_late_import_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        names = json.loads((tmp_path / f"threads{rank}.json").read_text())
        assert not [n for n in names if "gloo" in n], names


def test_helpers_without_a_process_group():
    assert distributed.rank_and_world() == (0, 1)
    assert distributed.shard(list(range(5)), 0, 2) == [0, 2, 4]
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1, 1, 1]
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    assert distributed.all_reduce_gradients([p], 0.5) == 8 and p.grad.tolist() == [1.5, 1.5]


def test_timeout_setting(monkeypatch):
    from ensdiv.errors import EnsdivError

    monkeypatch.setenv("ENSDIV_DIST_TIMEOUT", "12")
    assert distributed.timeout_seconds() == 12
    for bad in ("soon", "0", "-3"):
        monkeypatch.setenv("ENSDIV_DIST_TIMEOUT", bad)
        with pytest.raises(EnsdivError, match="ENSDIV_DIST_TIMEOUT"):
            distributed.timeout_seconds()


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test on Linux")
def test_a_rank_that_dies_fails_the_run_loudly(tmp_path):
    """One of two ranks exits before the first collective: the other fails within the
    timeout, torchrun exits non-zero, nothing hangs."""
    script = tmp_path / "die.py"
    script.write_text(
        "import os, sys, torch\n"
        "from ensdiv import distributed\n"
        "distributed.init_from_env(torch.device('cpu'))\n"
        "if distributed.rank_and_world()[0] == 1:\n"
        "    os._exit(3)\n"
        "distributed.all_reduce_sum(torch.ones(1))\n")
    env = {**os.environ, "ENSDIV_DIST_TIMEOUT": "20", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", "--master-port", str(_free_port()), str(script)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0


def _certify(out_file):
    from ensdiv.certification import certify_dataset

    torch.set_num_threads(1)
    _, test = _data()
    ens = Ensemble.build("mlp", 2, in_shape=(1, 8, 8), num_classes=10, seed=4).eval()
    return certify_dataset(ens, test, sigma=0.5, n0=20, n=200, alpha=0.01, batch_size=100,
                           out=out_file, skip=3, progress=False, seed=2)


def _certify_worker(rank, world, port, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    distributed.init_from_env(torch.device("cpu"))
    try:
        _certify(out_file)
    finally:
        distributed.shutdown()


def test_two_processes_certify_the_single_process_records(tmp_path):
    from ensdiv.io import read_jsonl

    single = _certify(tmp_path / "single" / "records.jsonl")
    out = tmp_path / "double" / "records.jsonl"
    # a resumed run: two examples already done by an earlier single process
    out.parent.mkdir()
    out.write_text("".join(json.dumps(r) + "\n" for r in single[:2]))
    mp.spawn(_certify_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    double = read_jsonl(out)
    assert [r["idx"] for r in double] == [r["idx"] for r in single] == list(range(0, 30, 3))
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in single]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in double] == strip
    assert not list(out.parent.glob("records.rank*"))  # merged and removed


def _torchrun(args, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ENSDIV_DIST_TIMEOUT": "120"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           "2", "--master-port", str(_free_port()), "-m", "ensdiv", *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


SWEEP = ["sweep", "--dataset", "digits", "--arch", "mlp", "--members", "2", "--lams", "0,0.5,1",
         "--seeds", "1", "--epochs", "1", "--attacks", "pgd", "--eps", "0.1", "--steps", "3",
         "--apgd-steps", "3", "--n-eval", "40", "--quiet"]


def test_torchrun_sweep_spreads_the_ensembles_and_writes_the_single_process_records(tmp_path):
    from ensdiv.cli import main
    from ensdiv.io import read_jsonl

    # each ensemble is trained and evaluated whole by one process, so with the thread count
    # pinned on both sides (CPU reductions split by thread) the records are equal, bit for bit
    assert main([*SWEEP, "--out", str(tmp_path / "one"), "--threads", "1"]) == 0
    proc = _torchrun([*SWEEP, "--out", str(tmp_path / "two"), "--threads", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("records in") == 1  # only rank 0 prints
    assert proc.stdout.count("surrogate ready") == 1  # trained by both: one line
    # each rank's own ensembles (λ 0 and 1 on rank 0, λ 0.5 on rank 1), prefixed
    for rank, lam in ((0, "0"), (1, "0.5"), (0, "1")):
        assert f"[rank {rank}] lam={lam} seed=0: acc" in proc.stdout, proc.stdout

    def strip(r):
        return {k: v for k, v in r.items() if k not in ("time", "train_seconds",
                                                        "eval_seconds")}

    one = [strip(r) for r in read_jsonl(tmp_path / "one" / "records.jsonl")]
    two = [strip(r) for r in read_jsonl(tmp_path / "two" / "records.jsonl")]
    assert two == one and [r["lam"] for r in two] == [0.0, 0.5, 1.0]
    assert not list((tmp_path / "two").glob("records.rank*"))


def test_torchrun_train_matches_one_process_and_resumes(tmp_path):
    from ensdiv.cli import main
    from ensdiv.io import read_jsonl

    args = ["train", "--dataset", "digits", "--arch", "cnn", "--members", "2", "--epochs", "1",
            "--diversity", "gal", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one"), "--threads", "1"]) == 0
    proc = _torchrun([*args, "--out", str(tmp_path / "two"), "--threads", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _torchrun(["train", "--out", str(tmp_path / "two"), "--resume", "--epochs", "2",
                      "--quiet", "--threads", "1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = read_jsonl(tmp_path / "one" / "metrics.jsonl")
    two = read_jsonl(tmp_path / "two" / "metrics.jsonl")
    # float32 here (the equivalence itself is test_two_processes_train_the_single_process_run,
    # in float64): the all-reduce's order moves each gradient by ~1e-7 relative and Adam turns
    # that into visible steps only for weights whose gradient is round-off, which move the loss
    # at second order; the epoch's mean loss agrees to ~1e-6, so 1e-4 leaves 100× room
    assert len(two) == 2 and two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-4)


def test_commands_that_do_not_scale_out_refuse_torchrun(monkeypatch, capsys, tmp_path):
    from ensdiv.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["detect", str(tmp_path / "run"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ensdiv: error: ensdiv detect runs in one process") and \
        "train, certify, sweep" in err
    assert not (tmp_path / "d").exists()


def test_a_global_batch_smaller_than_the_world_fails_before_the_run_folder_is_written(
        monkeypatch, tmp_path):
    from ensdiv.errors import EnsdivError
    from ensdiv.runs import train
    from ensdiv.training import TrainConfig

    monkeypatch.setattr(train, "rank_and_world", lambda: (0, 4))
    config = TrainConfig(arch="mlp", members=2, epochs=1, batch_size=3)
    with pytest.raises(EnsdivError, match="global batch, split over 4 processes: give at least 4"):
        train.train_run(config, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
