import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # the machine is shared; one thread keeps the suite polite and deterministic
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
