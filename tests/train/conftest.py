"""Every training test starts from the same torch random state and runs on one CPU thread
(the tensors are small; on a loaded machine a second OpenMP thread mostly waits)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
