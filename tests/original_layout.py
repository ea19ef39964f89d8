"""Small checkpoints in the ORIGINAL layouts (docs/method.md §4), for converter tests that must not need the 795 MB
fixture."""

from pathlib import Path

import torch


PATCH = 16


def block(prefix: str, dim: int, mlp: int) -> dict[str, torch.Tensor]:
    """A timm ViT block's tensors under `prefix`."""
    # The original's names and shapes as a table: a layer's weight and bias on one line (fmt: skip keeps them).
    shapes = {
        "norm1.weight": (dim,), "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim), "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
        "norm2.weight": (dim,), "norm2.bias": (dim,),
        "mlp.fc1.weight": (mlp, dim), "mlp.fc1.bias": (mlp,),
        "mlp.fc2.weight": (dim, mlp), "mlp.fc2.bias": (dim,),
    }  # fmt: skip
    return {prefix + name: 0.05 * torch.randn(shape) for name, shape in shapes.items()}


def encoder_state(dim: int = 32, layers: int = 2, mels: int = 80, frames: int = 208) -> dict[str, torch.Tensor]:
    """The M2D ViT encoder keys (`cls_token`, `pos_embed`, `norm_stats`, `patch_embed.*`, `blocks.*`, `norm.*`)."""
    grid = (mels // PATCH) * (frames // PATCH)
    state = {
        "cls_token": 0.02 * torch.randn(1, 1, dim),
        "pos_embed": 0.1 * torch.randn(1, 1 + grid, dim),
        "norm_stats": torch.tensor([-6.5, 4.0]),
        "patch_embed.proj.weight": 0.02 * torch.randn(dim, 1, PATCH, PATCH),
        "patch_embed.proj.bias": torch.zeros(dim),
    }
    for i in range(layers):
        state.update(block(f"blocks.{i}.", dim, 2 * dim))
    state.update({"norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim)})
    return state


def semantic_projector_state(dim: int = 32) -> dict[str, torch.Tensor]:
    """The 2025 AudioToSemantic projector (`audio_proj.sem_token`, one block with MLP width = dim, final norm)."""
    state = {"audio_proj.sem_token": 0.02 * torch.randn(1, 1, dim)}
    state.update(block("audio_proj.sem_blocks.0.", dim, dim))
    state.update({"audio_proj.norm.weight": torch.ones(dim), "audio_proj.norm.bias": torch.zeros(dim)})
    return state


def mlp_projector_state(dim: int = 32) -> dict[str, torch.Tensor]:
    """The 2024 projector: `audio_proj.0` Linear, ReLU, `audio_proj.2` Linear."""
    # The original's projector as a table: a layer's weight and bias on one line (fmt: skip keeps them).
    return {
        "audio_proj.0.weight": 0.05 * torch.randn(dim, dim), "audio_proj.0.bias": torch.zeros(dim),
        "audio_proj.2.weight": 0.05 * torch.randn(dim, dim), "audio_proj.2.bias": torch.zeros(dim),
    }  # fmt: skip


def save(
    state: dict, directory: Path, folder_name: str, file_name: str = "checkpoint-1.pth", wrap: bool = True
) -> Path:
    """Writes `state` as the training code does (`{'model': state, 'epoch': ...}`) under `directory/folder_name`."""
    path = Path(directory) / folder_name / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "epoch": 1} if wrap else state, path)
    return path
