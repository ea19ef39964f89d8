"""Optimiser parameter groups and learning-rate schedules of the original recipes (MAE-style)."""

import math

import torch
from torch import nn


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups over the trainable parameters, as the original (timm `add_weight_decay`): no decay for
    tensors with at most one dimension or named `*.bias` (norms, biases, the 0-d temperature), `weight_decay` for
    everything else, including the CLS, mask and semantic tokens and the patch projection."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 or name.endswith(".bias") else decay).append(parameter)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def scaled_learning_rate(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule of the recipe: lr = base_lr · global batch / 256."""
    return base_lr * global_batch_size / 256


def warmup_cosine_lambda(warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
    """Per-step multiplier: linear warm-up from 0, then half-cycle cosine down to `min_ratio` (MAE's schedule,
    evaluated per iteration)."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(warmup_steps, total_steps, min_ratio))
