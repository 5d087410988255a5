import pytest
import torch

# Test models are tiny: one thread is as fast as two and cannot oversubscribe a shared 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
