"""Data-parallel GAL training simulated with 4 gloo processes on CPU: bytes all-reduced per
step, and how a step's time splits between computing and communicating.

    python benchmarks/bench_distributed.py [--procs 4] [--out FILE.json]

Each process holds the whole ensemble (cnn 28×28, M = 3) and computes the GAL loss and its
double backward on its slice of a global batch of 128, then ``ensdiv.distributed
.all_reduce_gradients`` averages the gradients (one coalesced all-reduce). A barrier before the
all-reduce separates waiting for the slowest rank from the transfer itself. On this 2-core
machine four processes share two cores, so the compute times are not a scaling measurement;
the bytes per step are exact, and the all-reduce time is gloo over loopback. The README turns
them into the expected scaling on GPUs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ensdiv import distributed
from ensdiv.objective import ensemble_loss

from _common import SMOKE, batch, machine, make_ensemble

SHAPE, M, GLOBAL_BATCH = ((1, 8, 8), 2, 16) if SMOKE else ((1, 28, 28), 3, 128)


#: Links for the README's estimate (nominal one-way bandwidths).
LINKS = [("NVLink", 100.0), ("PCIe 4.0 x16", 16.0), ("10 Gb Ethernet", 1.25)]


def _worker(rank: int, world: int, port: int, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_env(torch.device("cpu"))
    try:
        ens = make_ensemble("cnn", M, SHAPE, "cpu")
        x, y = batch(SHAPE, GLOBAL_BATCH, "cpu")
        x, y = x[rank::world], y[rank::world]
        params = list(ens.parameters())
        opt = torch.optim.Adam(params, lr=1e-3)
        loss_fn = functools.partial(ensemble_loss, diversity="gal", lam=0.5)
        compute, comm, volume = [], [], 0
        for step in range(steps + 1):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss_fn(ens, x, y)[0].backward()
            t1 = time.perf_counter()
            distributed.barrier()
            t2 = time.perf_counter()
            volume = distributed.all_reduce_gradients(params, len(y) / GLOBAL_BATCH)
            t3 = time.perf_counter()
            opt.step()
            if step:  # the first step warms up
                compute.append(t1 - t0)
                comm.append(t3 - t2)
        timings = distributed.gather_objects((statistics.median(compute),
                                              statistics.median(comm)))
        if rank == 0:
            n_params = sum(p.numel() for p in params)
            result = {**machine("cpu"), "procs": world, "model": f"cnn {SHAPE}, M = {M}",
                      "global_batch": GLOBAL_BATCH, "steps": steps, "parameters": n_params,
                      "bytes_per_step": volume,
                      "compute_s": max(t[0] for t in timings),
                      "allreduce_s": statistics.median(t[1] for t in timings)}
            Path(out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        distributed.shutdown()


def simulate(procs: int, steps: int, out: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(procs, port, steps, out), nprocs=procs, join=True)
    return json.loads(Path(out).read_text())


def table(r: dict) -> str:
    """The README's table from a saved result."""
    share = r["allreduce_s"] / (r["allreduce_s"] + r["compute_s"])
    rows = [("processes (gloo, CPU)", f"{r['procs']}"),
            ("model", f"{r['model']}, global batch {r['global_batch']}, GAL"),
            ("parameters", f"{r['parameters']:,}"),
            ("all-reduced per step", f"{r['bytes_per_step'] / 1e6:.2f} MB (float32 gradients)"),
            ("compute per step (slowest rank, 4 processes on 2 cores)",
             f"{r['compute_s'] * 1000:.0f} ms"),
            ("all-reduce per step (gloo, loopback)", f"{r['allreduce_s'] * 1000:.1f} ms"),
            ("communication share of the step", f"{share:.1%}")]
    # a ring all-reduce moves 2·(N − 1)/N of the buffer through each rank's link
    for name, gbps in LINKS:
        t = 2 * (8 - 1) / 8 * r["bytes_per_step"] / (gbps * 1e9)
        rows.append((f"estimate, 8 ranks over {name} ({gbps:g} GB/s)", f"{t * 1000:.2f} ms"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def test_simulated_data_parallel_step(tmp_path):
    """Smoke: 2 processes, tiny sizes (the README's figures come from ``main``)."""
    r = simulate(2, 1, str(tmp_path / "d.json"))
    assert r["bytes_per_step"] == 4 * r["parameters"]
    assert table(r).count("|") > 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="distributed.json")
    args = ap.parse_args()
    print(table(simulate(args.procs, args.steps, args.out)))


if __name__ == "__main__":
    sys.exit(main())
