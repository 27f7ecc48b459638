"""train/loop.py's learning-rate schedule beside transformers' schedulers: why the loop keeps its own."""
import pytest
import torch
from torch import nn
from transformers import get_scheduler
from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

from train.loop import LoopConfig, lr_lambda


def _transformers_factors(config: LoopConfig, total_steps: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    if config.lr_schedule == "cosine":
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, config.warmup_steps, total_steps,
                                                                min_lr_rate=config.min_lr_ratio)
    else:
        name = {"linear": "linear", "constant": "constant_with_warmup"}[config.lr_schedule]
        scheduler = get_scheduler(name, optimizer, config.warmup_steps, total_steps)
    factors = []
    for _ in range(total_steps):
        factors.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return factors


@pytest.mark.parametrize("schedule, min_lr_ratio", [("linear", 0.0), ("cosine", 0.0), ("cosine", 0.1),
                                                    ("constant", 0.0)])
def test_schedule_decays_as_transformers_schedulers_and_warms_up_from_the_first_step(schedule, min_lr_ratio):
    """The decay is transformers'; their warmup is one step later (the first step's learning rate is 0
    there, 1/warmup here), so taking theirs would change every run's schedule."""
    total, warmup = 14, 4
    plain = LoopConfig(output_dir="x", lr_schedule=schedule, min_lr_ratio=min_lr_ratio)
    ours = lr_lambda(plain, total)
    assert [ours(s) for s in range(total)] == pytest.approx(_transformers_factors(plain, total))
    warm = LoopConfig(output_dir="x", lr_schedule=schedule, min_lr_ratio=min_lr_ratio, warmup_steps=warmup)
    ours, theirs = lr_lambda(warm, total), _transformers_factors(warm, total)
    assert [ours(s) for s in range(warmup - 1)] == pytest.approx(theirs[1:warmup])
    assert theirs[0] == 0 and ours(0) == 1 / warmup

