"""Test-wide settings."""

import torch._dynamo

# The backend sweeps compile FlexAttention once per mask pattern; more than dynamo's default of 8
# would silently fall back to the uncompiled path and stop testing the compiled kernel.
torch._dynamo.config.recompile_limit = 64
