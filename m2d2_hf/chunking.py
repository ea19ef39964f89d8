"""Chunking of long inputs, as the original runtime does it, but packed into one batch.

The original encodes a clip of T frames as ceil(T / chunk_frames) independent chunks: the normalised log-mel is
right-padded with zeros to make the last chunk a multiple of the patch width, every chunk restarts at position 0,
and each full chunk drops its `chunk_frames % patch_width` trailing frames. Here the chunks of all clips of a batch
are gathered into one tensor (shorter chunks zero-filled, their padding columns masked out of attention), encoded
in a single forward pass, and the outputs are scattered back per clip in the original order.

Batches of equal-length clips without padding (`EqualLengthChunks`) need no plan: every clip has the same chunks,
so the full chunks and the last chunk are cut with reshapes and slices whose sizes are arithmetic in the number of
frames. No Python loop and no value read back from a tensor, so `torch.export` traces it with a symbolic batch
axis. A symbolic time axis needs `PaddedChunks`: its chunk widths do not depend on the number of frames, which the
symbolic shape solver cannot reason about through floor divisions.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ChunkLayout:
    """Where every chunk of every clip lives in the packed batch, and how to read the outputs back.

    Attributes:
        clip_index: [N] clip of each chunk.
        start_frame: [N] first frame of each chunk in its clip.
        columns: [N] patch columns of each chunk (62 for a full 1001-frame chunk).
        max_columns: columns of the packed batch (the widest chunk).
        frequency_patches: rows of the patch grid.
        token_index: [B, max_tokens] position of each output token in the flattened packed tokens [N * F * C].
        token_mask: [B, max_tokens] True where the token exists.
        frame_index: [B, max_frames] position of each output frame in the flattened packed columns [N * C].
        frame_mask: [B, max_frames] True where the frame exists.
    """

    clip_index: torch.Tensor
    start_frame: torch.Tensor
    columns: torch.Tensor
    max_columns: int
    frequency_patches: int
    token_index: torch.Tensor
    token_mask: torch.Tensor
    frame_index: torch.Tensor
    frame_mask: torch.Tensor

    @classmethod
    def from_lengths(
        cls,
        lengths: list[int],
        chunk_frames: int,
        patch_width: int,
        frequency_patches: int,
        device: torch.device | str = "cpu",
    ) -> "ChunkLayout":
        """Plans the chunks of clips of `lengths` frames."""
        clip_index, start_frame, columns = [], [], []
        for clip, length in enumerate(lengths):
            if length < 1:
                raise ValueError(f"clip {clip} has no frames: every clip needs at least one log-mel frame")
            for start, cols in cls.plan_clip(length, chunk_frames, patch_width):
                clip_index.append(clip)
                start_frame.append(start)
                columns.append(cols)
        max_columns = max(columns)

        token_rows, frame_rows = [[] for _ in lengths], [[] for _ in lengths]
        tokens_per_chunk = frequency_patches * max_columns
        for chunk, (clip, cols) in enumerate(zip(clip_index, columns)):
            # Tokens of one chunk in frequency-major order (f * cols + t), as the original emits them.
            for f in range(frequency_patches):
                base = chunk * tokens_per_chunk + f * max_columns
                token_rows[clip].extend(range(base, base + cols))
            frame_rows[clip].extend(range(chunk * max_columns, chunk * max_columns + cols))

        token_index, token_mask = _pad_rows(token_rows, device)
        frame_index, frame_mask = _pad_rows(frame_rows, device)

        def as_tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            clip_index=as_tensor(clip_index),
            start_frame=as_tensor(start_frame),
            columns=as_tensor(columns),
            max_columns=max_columns,
            frequency_patches=frequency_patches,
            token_index=token_index,
            token_mask=token_mask,
            frame_index=frame_index,
            frame_mask=frame_mask,
        )

    @staticmethod
    def plan_clip(num_frames: int, chunk_frames: int, patch_width: int) -> list[tuple[int, int]]:
        """(first frame, patch columns) of each chunk of one clip of `num_frames` frames, without the packing
        indices: what a caller that encodes a long clip a few chunks at a time needs (`m2d2_hf.long_audio`)."""
        plan = []
        for start in range(0, num_frames, chunk_frames):
            frames = min(chunk_frames, num_frames - start)
            # The last chunk is zero-padded up to a whole patch, but never beyond one full chunk.
            padded = min(math.ceil(frames / patch_width) * patch_width, chunk_frames)
            plan.append((start, padded // patch_width))
        return plan

    @property
    def num_chunks(self) -> int:
        return self.clip_index.numel()

    @property
    def is_uniform(self) -> bool:
        """True when every chunk has the full packed width, so attention needs no padding mask."""
        return bool((self.columns == self.max_columns).all())

    def pack(self, features: torch.Tensor, lengths: torch.Tensor, patch_width: int) -> torch.Tensor:
        """Gathers the chunks of `features` [B, F, T] (valid frames per clip: `lengths`) into [N, F, C * patch_width].

        Frames past a clip's end read as zero: the original's zero padding in normalised space.
        """
        width = self.max_columns * patch_width
        offsets = torch.arange(width, device=features.device)
        frame = self.start_frame[:, None] + offsets[None, :]
        valid = frame < lengths[self.clip_index][:, None]
        frame = frame.clamp(max=features.shape[-1] - 1)
        chunks = features[self.clip_index[:, None], :, frame]  # [N, W, F]
        return (chunks * valid[..., None].to(chunks.dtype)).transpose(1, 2)

    def token_padding_mask(self) -> torch.Tensor:
        """[N, F * C] True for the patch tokens of each chunk's real columns."""
        column_valid = torch.arange(self.max_columns, device=self.columns.device)[None, :] < self.columns[:, None]
        return column_valid[:, None, :].expand(-1, self.frequency_patches, -1).reshape(self.num_chunks, -1)

    def unpack_tokens(self, chunk_tokens: torch.Tensor) -> torch.Tensor:
        """[N, F * C, D] packed patch tokens → [B, max_tokens, D] per clip, chunks concatenated, padding zero."""
        flat = chunk_tokens.reshape(-1, chunk_tokens.shape[-1])
        return flat[self.token_index] * self.token_mask[..., None].to(flat.dtype)

    def unpack_frames(self, chunk_tokens: torch.Tensor) -> torch.Tensor:
        """[N, F * C, D] packed patch tokens → [B, max_frames, F * D] frame features (low band first)."""
        n, _, dim = chunk_tokens.shape
        by_column = chunk_tokens.reshape(n, self.frequency_patches, self.max_columns, dim).transpose(1, 2)
        flat = by_column.reshape(n * self.max_columns, self.frequency_patches * dim)
        return flat[self.frame_index] * self.frame_mask[..., None].to(flat.dtype)


@dataclass(frozen=True)
class EqualLengthChunks:
    """The chunks of a batch of B clips of T frames each: `full` [B * (n - 1), F, W_full] holds the n - 1 full
    chunks of every clip (clip-major, their trailing `chunk_frames % patch_width` frames dropped) and `last`
    [B, F, W_last] the last chunk of each clip, zero-padded up to whole patches but never beyond `chunk_frames`
    (n = ceil(T / chunk_frames); `full` is empty for clips of one chunk). Sizes may be symbolic (torch.export)."""

    full: torch.Tensor
    last: torch.Tensor
    batch_size: int
    frequency_patches: int

    @classmethod
    def split(
        cls, features: torch.Tensor, chunk_frames: int, patch_width: int, frequency_patches: int
    ) -> "EqualLengthChunks":
        """Cuts `features` [B, F, T] (every frame real) into its chunks, as `ChunkLayout` plans them."""
        batch, bins, frames = features.shape
        num_full = (frames - 1) // chunk_frames  # ceil(T / chunk_frames) - 1
        full_width = (chunk_frames // patch_width) * patch_width
        full = features[..., : num_full * chunk_frames].reshape(batch, bins, num_full, chunk_frames)
        full = full[..., :full_width].permute(0, 2, 1, 3).reshape(batch * num_full, bins, full_width)
        rest = frames - num_full * chunk_frames
        last_width = torch.sym_min(-(-rest // patch_width), chunk_frames // patch_width) * patch_width
        last = F.pad(features[..., num_full * chunk_frames :], (0, last_width - rest))
        return cls(full=full, last=last, batch_size=batch, frequency_patches=frequency_patches)

    def merge_tokens(self, full_tokens: torch.Tensor, last_tokens: torch.Tensor) -> torch.Tensor:
        """Encoded patch tokens of `full` [B * (n - 1), F * C, D] and `last` [B, F * C', D] → [B, tokens, D] per
        clip, chunks concatenated (frequency-major within each chunk), as `ChunkLayout.unpack_tokens` orders them."""
        dim = last_tokens.shape[-1]
        return torch.cat([full_tokens.reshape(self.batch_size, -1, dim), last_tokens], dim=1)

    def merge_frames(self, full_tokens: torch.Tensor, last_tokens: torch.Tensor) -> torch.Tensor:
        """Encoded patch tokens → [B, frames, F * D] frame features (low band first), as
        `ChunkLayout.unpack_frames`."""
        full_frames = self._frames(full_tokens)
        full_frames = full_frames.reshape(self.batch_size, -1, full_frames.shape[-1])
        return torch.cat([full_frames, self._frames(last_tokens)], dim=1)

    def _frames(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, F * C, D] → [N, C, F * D]: the tokens of each patch column side by side."""
        chunks, length, dim = tokens.shape
        columns = length // self.frequency_patches
        by_column = tokens.reshape(chunks, self.frequency_patches, columns, dim).transpose(1, 2)
        return by_column.reshape(chunks, columns, self.frequency_patches * dim)


@dataclass(frozen=True)
class PaddedChunks:
    """The chunks of a batch of B clips of T frames each, all at the full chunk width: `chunks` [B * n, F, W_full]
    (clip-major) with the last chunk of each clip zero-filled past the clip's end, and `column_valid` [n, C] True for
    the patch columns that hold real frames (every column of the full chunks; the last chunk's first
    ceil(rest / patch_width) ones). Encoding `chunks` with the padding columns masked out of attention gives the real
    tokens `EqualLengthChunks` gives; the number of chunks comes from `Tensor.unfold` over a fixed padding, so no
    size depends on T through a floor division that torch.export's solver would have to prove: the graph takes any
    number of frames (the ONNX export's dynamic time axis)."""

    chunks: torch.Tensor
    column_valid: torch.Tensor
    batch_size: int
    frequency_patches: int

    @classmethod
    def split(
        cls, features: torch.Tensor, chunk_frames: int, patch_width: int, frequency_patches: int
    ) -> "PaddedChunks":
        """Cuts `features` [B, F, T] (every frame real) into ceil(T / chunk_frames) full-width chunks."""
        batch, bins, frames = features.shape
        columns = chunk_frames // patch_width
        # Zero-filled up to T + chunk_frames - 1 frames, which hold ceil(T / chunk_frames) whole chunks whatever T is.
        padded = F.pad(features, (0, chunk_frames - 1))
        # Read back as an unbacked size: the solver then reasons about it size-obliviously instead of guarding
        # on how T relates to it (n >= 2, B * n != B, ... for a backed floor division of T).
        num_chunks = (
            torch.scalar_tensor(frames + chunk_frames - 1, dtype=torch.long)
            .div(chunk_frames, rounding_mode="floor")
            .item()
        )
        torch._check(num_chunks >= 1)
        device = features.device
        chunk_start = torch.arange(num_chunks, device=device)[:, None] * chunk_frames
        frame = chunk_start + torch.arange(columns * patch_width, device=device)[None, :]  # [n, W_full]
        # A gather, not reshapes of a view: its output sizes are n and W_full by construction, with no divisibility
        # or contiguity for the solver to prove.
        chunks = padded.transpose(1, 2)[:, frame].reshape(batch * num_chunks, columns * patch_width, bins)
        first_frame = chunk_start + torch.arange(columns, device=device)[None, :] * patch_width
        return cls(chunks.transpose(1, 2), first_frame < frames, batch, frequency_patches)

    def token_mask(self) -> torch.Tensor:
        """[B * n, F * C] True for the patch tokens of real columns (frequency-major, as the encoder emits them)."""
        return self._chunk_token_mask().repeat(self.batch_size, 1)

    def _chunk_token_mask(self) -> torch.Tensor:
        """[n, F * C]: `token_mask` of one clip (every clip of the batch has the same chunks)."""
        num_chunks = self.column_valid.shape[0]
        return self.column_valid[:, None, :].expand(-1, self.frequency_patches, -1).reshape(num_chunks, -1)

    def merge_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoded [B * n, F * C, D] → [B, tokens, D]: the real tokens per clip, in `EqualLengthChunks`' order."""
        num_chunks, columns = self.column_valid.shape
        per_clip = tokens.reshape(self.batch_size, num_chunks * self.frequency_patches * columns, tokens.shape[-1])
        return _at_least_one(per_clip[:, self._chunk_token_mask().reshape(-1)])

    def merge_frames(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoded [B * n, F * C, D] → [B, frames, F * D] frame features of the real columns (low band first)."""
        dim = tokens.shape[-1]
        num_chunks, columns = self.column_valid.shape
        by_column = tokens.reshape(self.batch_size * num_chunks, self.frequency_patches, columns, dim).transpose(1, 2)
        frames = by_column.reshape(self.batch_size, num_chunks * columns, self.frequency_patches * dim)
        return _at_least_one(frames[:, self.column_valid.reshape(-1)])


def _at_least_one(selected: torch.Tensor) -> torch.Tensor:
    """`selected` [B, n, D], whose n (a boolean selection: unbacked under torch.export) is at least one, as every clip
    has a real column: told to the solver, so that code downstream (attention's `length > 1` checks) traces."""
    torch._check(selected.shape[1] >= 1)
    return selected


def _pad_rows(rows: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    index = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        index[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return index.to(device), mask.to(device)
