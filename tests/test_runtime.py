import pytest
import torch

from ensdiv.errors import EnsdivError
from ensdiv.runtime import available_cores, resolve_device, set_threads


def test_resolve_device_names_and_default():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "cuda:x", "mps"):
        with pytest.raises(EnsdivError, match="unknown device"):
            resolve_device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_missing_gpu_is_named_as_such():
    for name in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(EnsdivError, match="no usable CUDA GPU; use --device cpu"):
            resolve_device(name)


def test_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        # the default: $OMP_NUM_THREADS where set (as the suite's own thread sweep sets it),
        # else the cores available
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(None) == available_cores() >= 1
        for bad in (0, -2, 1.5, True):
            with pytest.raises(EnsdivError, match="threads must be an integer >= 1"):
                set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_default_threads_follow_omp_num_threads(monkeypatch):
    from ensdiv.runtime import available_cores, default_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    for ignored in ("0", "", "four", "-2"):
        monkeypatch.setenv("OMP_NUM_THREADS", ignored)
        assert default_threads() == available_cores()
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == available_cores()
