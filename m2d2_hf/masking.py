"""Patch masks of the M2D2 recipes (docs/method.md §5, §6.2): which patches of a [frequency × time] grid an
encoder sees.

All functions return `(visible_indices [B, V], masked_indices [B, L - V])` with patch p = f * time_patches + t and the
same V for every sample of a batch.
"""

import torch


def random_unstructured_mask(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, a random permutation of the patches: the first `int(L * (1 - ratio))` are visible, the rest
    masked (M2D pre-training, and stage 2 with `--random_mask`)."""
    num_visible = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch_size, num_patches, device=generator.device if generator else device, generator=generator)
    order = noise.argsort(dim=1).to(device)
    return order[:, :num_visible], order[:, num_visible:]


def complement_indices(visible_indices: torch.Tensor, num_patches: int) -> torch.Tensor:
    """The patches not in `visible_indices` [B, V], ascending, [B, L - V]."""
    hidden = torch.ones(visible_indices.shape[0], num_patches, dtype=torch.bool, device=visible_indices.device)
    hidden.scatter_(1, visible_indices, False)
    return hidden.nonzero()[:, 1].reshape(visible_indices.shape[0], -1)


def random_structured_mask(
    batch_size: int,
    frequency_patches: int,
    time_patches: int,
    mask_ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
    original_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency/time stripe masking of stage 2 and stage-1.1 fine-tuning.

    The stripe counts are drawn once per batch: NF = int(F·(r + 1/F)·u) rows (u ~ U[0, 1), at most F − 1), then
    NT = int(T·max(r + 0.5/T − NF/F, 0)) columns; every sample draws its own rows and columns, and their union
    (M = NF·T + NT·F − NF·NT patches, the same for all samples) is the stripe set.

    `original_order=True` reproduces what the original code does with it (the released model was trained so): its
    descending sort puts the stripe patches FIRST, so the encoder keeps the M stripe patches plus the first L − 2M
    others in index order and drops the last M non-stripe patches. `original_order=False` drops the stripes, which
    is what the method describes.
    """
    num_patches = frequency_patches * time_patches
    sampler_device = generator.device if generator is not None else device
    u = float(torch.rand((), generator=generator, device=sampler_device))
    rows = min(int(frequency_patches * (mask_ratio + 1 / frequency_patches) * u), frequency_patches - 1)
    columns = int(time_patches * max(mask_ratio + 0.5 / time_patches - rows / frequency_patches, 0.0))
    stripes = torch.zeros(batch_size, frequency_patches, time_patches, dtype=torch.bool, device=sampler_device)
    for sample in range(batch_size):
        stripes[sample, torch.randperm(frequency_patches, generator=generator, device=sampler_device)[:rows]] = True
        stripes[sample, :, torch.randperm(time_patches, generator=generator, device=sampler_device)[:columns]] = True
    stripes = stripes.reshape(batch_size, num_patches).to(device)
    marked = int(stripes[0].sum())
    # A stable sort keeps ties in index order, the likely tie order of the original's CUDA sort.
    order = stripes.to(torch.uint8).argsort(dim=1, descending=original_order, stable=True)
    num_visible = num_patches - marked
    return order[:, :num_visible], order[:, num_visible:]
