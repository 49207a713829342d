"""Test-wide settings and shared fixtures."""

import pytest
import torch
import torch._dynamo

# The backend sweeps compile FlexAttention once per mask pattern; more than dynamo's default of 8
# would silently fall back to the uncompiled path and stop testing the compiled kernel.
torch._dynamo.config.recompile_limit = 64


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are bound by per-op overhead: on a busy machine a second thread only waits.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
