"""Optimiser parameter groups and learning-rate schedules of the original recipes (MAE-style)."""

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup


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


def adamw(param_groups: list[dict], lr: float, betas: tuple[float, float]) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over `param_groups`, with torch's fused kernel where every parameter is a floating-point
    tensor on a device that has it (CPU, CUDA and others; the plain per-tensor loop otherwise). Off CUDA, torch's
    default is that loop: about ten passes over each tensor, which on the CPU made the optimiser step of a ViT-B
    stage-1 step 8x slower than the fused single pass (`benchmarks/README.md`). The update is the same to rounding
    (a few 1e-8 absolute on unit-scale weights)."""
    from torch.optim import optimizer

    # torch's own list of the devices with a fused AdamW (private; CUDA alone where a torch lacks it).
    supported = getattr(optimizer, "_get_fused_kernels_supported_devices", lambda: ["cuda"])()
    parameters = [p for group in param_groups for p in group["params"]]
    fused = bool(parameters) and all(p.is_floating_point() and p.device.type in supported for p in parameters)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=fused or None)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (2-norm; gradients scaled by `max_norm / (norm + 1e-6)` clamped at 1),
    without its multiplication of every gradient by exactly 1 on the steps that clip nothing: the same gradients bit
    for bit and one pass less over them (ViT-B stage 1 on the CPU: 31 vs 50 ms a step). Deciding reads the norm
    back, which is free on the CPU, the device it is meant for. Returns the total norm, as torch's does."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    # torch's coefficient, compared as torch clamps it: a NaN norm clips (to NaN gradients), as it does in torch.
    if not bool(max_norm / (norm + 1e-6) >= 1.0):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def scaled_learning_rate(base_lr: float, global_batch_size: int) -> float:
    """The linear scaling rule of the recipe: lr = base_lr · global batch / 256."""
    return base_lr * global_batch_size / 256


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """MAE's schedule, evaluated per iteration: linear warm-up from 0, then a half-cycle cosine down to `min_ratio`
    of the base rate. transformers' cosine-with-warm-up computes the same numbers for every step of the run
    (0 … `total_steps`; tests/test_library_equivalence.py), so it is used as it is."""
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup_steps, total_steps, min_lr_rate=min_ratio)


def timm_cosine_lambda(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """timm `CosineLRScheduler(warmup_prefix=False)` per step, as the original fine-tuning: linear warm-up from 0,
    and a cosine that counts from step 0 (so it is at cos(π·warmup/total) when the warm-up ends) down to `min_ratio`.

    Hand-written because no installed library gives these numbers: transformers' and torch's cosine schedules start
    their cosine where the warm-up ends (SequentialLR restarts it at the milestone), and timm, whose scheduler this
    is, is not a dependency of the package."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(step / max(1, total_steps), 1.0)))

    return multiplier


def timm_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """The fine-tuning schedule (`timm_cosine_lambda`) as a `LambdaLR`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, timm_cosine_lambda(warmup_steps, total_steps, min_ratio))
