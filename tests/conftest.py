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
