"""Detection scoring throughput: inputs per second through ``DisagreementDetector.score``
(every member's forward on the batch, then the disagreement score), for each score.
"""

import pytest

from ensdiv.disagreement import SCORE_NAMES, DisagreementDetector

from _common import DEVICES, SMOKE, batch, machine, make_ensemble, sync


def cases():
    if SMOKE:
        return [("cpu", "cnn", (1, 8, 8), 2, 16)]
    out = [("cpu", "cnn", (1, 28, 28), m, 2048) for m in (3, 8)]
    if "cuda" in DEVICES:
        out += [("cuda", arch, shape, m, 16384) for arch, shape in
                [("cnn", (1, 28, 28)), ("resnet20", (3, 32, 32))] for m in (3, 8)]
    return out


@pytest.mark.parametrize("score", SCORE_NAMES)
@pytest.mark.parametrize("device,arch,shape,m,size", cases())
def test_score(benchmark, device, arch, shape, m, size, score):
    ens = make_ensemble(arch, m, shape, device).eval()
    det = DisagreementDetector(ens, score=score)
    x, _ = batch(shape, size, device)

    def run():
        det.score(x, batch_size=512)
        sync(device)

    benchmark.group = f"{device} {arch} detection M={m}"
    benchmark.pedantic(run, rounds=1 if SMOKE else 3, warmup_rounds=0 if SMOKE else 1)
    seconds = benchmark.stats.stats.median if benchmark.stats else float("nan")
    benchmark.extra_info.update(machine(device), bench="detect", arch=arch, shape=list(shape),
                                m=m, inputs=size, score=score, inputs_per_s=size / seconds)
