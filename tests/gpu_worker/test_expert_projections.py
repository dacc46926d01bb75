"""Every compute form's two projections (for families whose activation or biases sit between them)
compose back into the form's own SwiGLU call, with the form's numerics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expert_store.codec import encode_expert
from gpu_worker.expert_compute import make_expert_compute

CASES = [("bf16", "fp32"), ("bf16", "dequant_per_use"), ("int8", "bf16"), ("int4", "int4_fused"),
         ("int2", "dequant_per_use")]


@pytest.mark.parametrize("fmt,form", CASES)
def test_projections_compose_into_the_call(fmt, form):
    g = torch.Generator().manual_seed(0)
    hidden, inter = 128, 64
    w = [torch.randn(inter, hidden, generator=g) * 0.05, torch.randn(inter, hidden, generator=g) * 0.05,
         torch.randn(hidden, inter, generator=g) * 0.05]
    expert = make_expert_compute(fmt, encode_expert(fmt, *w), hidden, inter, form)
    x = torch.randn(5, hidden, generator=g)
    gate, up = expert.project_in(x)
    assert gate.shape == up.shape == (5, inter) and gate.dtype == torch.float32
    y = expert.project_out(F.silu(gate) * up)
    torch.testing.assert_close(y, expert(x), rtol=2e-2 if form in ("bf16", "int4_fused") else 1e-6, atol=1e-3)
    assert expert.project_in(x[:0])[0].shape == (0, inter) and expert.project_out(gate[:0]).shape == (0, hidden)
