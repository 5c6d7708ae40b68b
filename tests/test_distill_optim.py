"""The distillation optimizer choice: AdamW everywhere, bitsandbytes' 8-bit AdamW on CUDA only."""

from __future__ import annotations

import pytest
import torch

from moetool.distill.optim import make_optimizer
from moetool.distill.options import DistillOptions
from moetool.errors import UsageError


def test_adamw_and_refusals_on_cpu():
    param = torch.nn.Parameter(torch.ones(4))
    opt = make_optimizer("adamw", [{"params": [param], "weight_decay": 0.0}], 1e-3, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.95)
    with pytest.raises(UsageError) as info:
        make_optimizer("adamw8bit", [{"params": [param]}], 1e-3, torch.device("cpu"))
    assert "CUDA" in info.value.message
    with pytest.raises(UsageError):
        DistillOptions(optimizer="sgd").check()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adamw8bit_trains_on_cuda():
    pytest.importorskip("bitsandbytes")
    target = torch.randn(4096, device="cuda")
    param = torch.nn.Parameter(torch.zeros(4096, device="cuda"))
    opt = make_optimizer("adamw8bit", [{"params": [param], "weight_decay": 0.0}], 0.05, torch.device("cuda"))
    first = None
    for _ in range(50):
        loss = (param - target).pow(2).mean()
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.5 * first
    state = next(iter(opt.state.values()))
    assert state["state1"].dtype == torch.uint8  # the moments really are 8-bit
