"""Where a library computes the package's numbers, the package uses it, and these tests say so; where the package
keeps its own code, they show the difference that keeps it (schedules, mel bank, top-k accuracy, gradient clipping)."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import top_k_accuracy_score
from transformers import get_scheduler
from transformers.audio_utils import mel_filter_bank

from m2d2_hf.evaluation.metrics import top_k_accuracy
from m2d2_hf.feature_extraction_m2d2 import M2D2FeatureExtractor, slaney_mel_filter_bank
from m2d2_hf.training.optim import clip_grad_norm_, timm_cosine_lambda, warmup_cosine_schedule


def learning_rates(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The optimiser's learning rate at iterations 0 … steps, stepping optimiser and scheduler as a training loop."""
    rates = []
    for _ in range(steps + 1):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def optimizer(lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def mae_rate(step: int, base_lr: float, min_lr: float, warmup: int, total: int) -> float:
    """MAE's `adjust_learning_rate` (util/lr_sched.py), evaluated per iteration."""
    if step < warmup:
        return base_lr * step / warmup
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("min_ratio", [0.0, 0.01])
def test_the_pretraining_schedule_is_transformers_cosine_with_mae_numbers(min_ratio):
    base, warmup, total = 2.4e-3, 37, 500
    rates = learning_rates(warmup_cosine_schedule(optimizer(base), warmup, total, min_ratio), total)
    expected = [mae_rate(step, base, base * min_ratio, warmup, total) for step in range(total + 1)]
    assert rates == pytest.approx(expected, rel=1e-12, abs=1e-18)
    name = "cosine_with_min_lr" if min_ratio else "cosine"
    extra = {"scheduler_specific_kwargs": {"min_lr_rate": min_ratio}} if min_ratio else {}
    library = get_scheduler(name, optimizer(base), num_warmup_steps=warmup, num_training_steps=total, **extra)
    assert learning_rates(library, total) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_the_fine_tuning_schedule_is_not_one_a_library_gives():
    """timm's warmup_prefix=False cosine counts from step 0; transformers' starts its cosine after the warm-up."""
    warmup, total, min_ratio = 15, 70, 0.02
    timm = timm_cosine_lambda(warmup, total, min_ratio)
    library = get_scheduler(
        "cosine_with_min_lr",
        optimizer(1.0),
        num_warmup_steps=warmup,
        num_training_steps=total,
        scheduler_specific_kwargs={"min_lr_rate": min_ratio},
    ).lr_lambdas[0]
    assert [timm(step) for step in range(warmup)] == pytest.approx([library(step) for step in range(warmup)])
    assert timm(warmup) == pytest.approx(min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * warmup / total)))
    assert library(warmup) == 1.0 and timm(warmup) < 0.9  # the two part where the warm-up ends


@pytest.mark.parametrize(("mels", "n_fft", "rate", "f_max"), [(80, 400, 16000, 8000.0), (128, 1024, 32000, 14000.0)])
def test_the_slaney_bank_matches_transformers_mel_filter_bank(mels, n_fft, rate, f_max):
    """transformers' bank is float64; the package keeps its own for the original's float32 rounding steps, which
    the front end's bit-exact parity needs (the float32 cast of the library's bank differs by an ulp in ~0.5 %)."""
    ours = slaney_mel_filter_bank(mels, n_fft, rate, 50.0, f_max)
    library = mel_filter_bank(n_fft // 2 + 1, mels, 50.0, f_max, rate, norm="slaney", mel_scale="slaney").T
    assert ours.shape == library.shape and ours.dtype == np.float32
    assert np.array_equal(ours == 0, library == 0)  # the same triangles
    # Each weight within two float32 roundings of the float64 value (measured: 1.0e-7 relative at most).
    assert np.all(np.abs(ours - library) <= 1.2e-7 * np.abs(library))
    defaults = M2D2FeatureExtractor()
    if (mels, n_fft, rate, f_max) == (defaults.feature_size, defaults.n_fft, defaults.sampling_rate, defaults.f_max):
        assert np.abs(ours - library).max() <= 1.3e-9  # the front end's bank: 1.2e-9 measured


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_accuracy_equals_sklearn_on_untied_scores(k):
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((200, 7))
    targets = rng.integers(0, 7, 200)
    expected = top_k_accuracy_score(targets, scores, k=k, labels=np.arange(7))
    assert top_k_accuracy(scores, targets, k) == pytest.approx(expected, abs=1e-12)


def test_top_k_accuracy_breaks_ties_as_argmax_where_sklearn_does_not():
    scores, targets = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]]), np.array([0, 1])
    assert top_k_accuracy(scores, targets, 1) == 1.0 == float(np.mean(scores.argmax(1) == targets))
    assert top_k_accuracy_score(targets, scores, k=1, labels=np.arange(3)) == 0.0


def gradients(scale: float) -> list[torch.nn.Parameter]:
    """Parameters with random gradients of total 2-norm about `scale` (one without a gradient)."""
    generator = torch.Generator().manual_seed(0)
    parameters = [torch.nn.Parameter(torch.zeros(shape)) for shape in ((64, 32), (32,), (7, 5, 3), (4,))]
    for parameter in parameters[:3]:
        parameter.grad = torch.randn(parameter.shape, generator=generator)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters[:3]])
    for parameter in parameters[:3]:
        parameter.grad.mul_(scale / norm)
    return parameters


@pytest.mark.parametrize("scale", [0.5, 3.0 - 1e-7, 3.0, 3.0 + 1e-6, 30.0, math.inf, math.nan])
def test_gradient_clipping_is_torch_s_bit_for_bit(scale, monkeypatch):
    """Below the threshold (and just under it, where torch's 1e-6 still makes the coefficient < 1), at it and above,
    and for infinite or NaN norms, the gradients and the returned norm are torch's; the multiplication by 1 that the
    package leaves out is left out only where torch's coefficient is exactly 1."""
    ours, theirs = gradients(scale), gradients(scale)
    clipped = []
    clip = torch.nn.utils.clip_grads_with_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *args: clipped.append(True) or clip(*args))
    norm = clip_grad_norm_(ours, 3.0)
    monkeypatch.undo()
    expected = torch.nn.utils.clip_grad_norm_(theirs, 3.0)
    assert torch.equal(norm, expected) or (norm.isnan() and expected.isnan())
    for a, b in zip(ours, theirs):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad.nan_to_num(), b.grad.nan_to_num())
    coefficient = 3.0 / (expected + 1e-6)
    assert bool(clipped) == (not bool(coefficient >= 1.0)), (scale, float(coefficient))
