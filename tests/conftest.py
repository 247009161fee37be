import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # CLI calls set the global thread count (--threads); CPU float reductions depend on it, so
    # every test starts from the same count and leaves it as found.
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many tiny models (two shared cores only fight)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
