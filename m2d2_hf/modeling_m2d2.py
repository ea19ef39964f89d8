"""M2D2 audio encoder (M2D ViT) and the M2D2 / M2D-CLAP audio-language model."""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, SequenceClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.utils import ModelOutput, can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .chunking import ChunkLayout, EqualLengthChunks, PaddedChunks
from .configuration_m2d2 import M2D2AudioConfig, M2D2Config, auto_map_kept_on_disk_only
from .long_audio import M2D2LongAudioOutput, embed_long_audio


@dataclass
class M2D2AudioModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_tokens, hidden_size)`):
        Patch tokens after the final LayerNorm. Per clip: the tokens of each chunk in frequency-major order
        (`f * columns + t`), chunks concatenated; padded with zeros past `token_mask`.
    token_mask (`torch.LongTensor` of shape `(batch_size, num_tokens)`):
        1 for the tokens that exist, 0 for padding (integers, as transformers' attention masks, so that generic
        code can compare and subtract outputs; use `token_mask.bool()` to index).
    frame_features (`torch.FloatTensor` of shape `(batch_size, num_frames, frequency_patches * hidden_size)`):
        One feature per patch column (160 ms for 16-frame patches): the tokens of all frequency rows
        concatenated, low band first.
    frame_mask (`torch.LongTensor` of shape `(batch_size, num_frames)`):
        1 for the frames that exist, 0 for padding.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, frequency_patches * hidden_size)`):
        Clip embedding: the mean of the frame features over the clip's frames.
    hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True`):
        The patch tokens after the embeddings and after each layer (before the final LayerNorm), in the layout
        of `last_hidden_state`.
    attentions (`tuple(torch.FloatTensor)`, returned with `output_attentions=True` and eager attention):
        Per encoder layer, the softmax attention weights `(num_chunks, num_heads, 1 + chunk_tokens, 1 + chunk_tokens)`
        of every encoded chunk (CLS first), the chunks of all clips in batch order: one chunk per clip for clips of
        at most `chunk_frames` frames. As in transformers, SDPA computes no weights (it warns): load the model with
        `attn_implementation="eager"` or call `model.set_attn_implementation("eager")` to get them.
    """

    last_hidden_state: torch.FloatTensor | None = None
    token_mask: torch.LongTensor | None = None
    frame_features: torch.FloatTensor | None = None
    frame_mask: torch.LongTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class M2D2ClapOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, returned with `return_loss=True`):
        Symmetric contrastive loss (mean of the audio→text and text→audio cross-entropies).
    logits_per_audio (`torch.FloatTensor` of shape `(audio_batch_size, text_batch_size)`):
        Cosine similarities scaled by `exp(logit_scale)`.
    logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, audio_batch_size)`):
        The transpose of `logits_per_audio`.
    text_embeds, audio_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
        L2-normalised embeddings.
    text_model_output, audio_model_output: the towers' own outputs.
    """

    loss: torch.FloatTensor | None = None
    logits_per_audio: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    text_model_output: BaseModelOutputWithPooling | None = None
    audio_model_output: M2D2AudioModelOutput | None = None

    def to_tuple(self) -> tuple:
        return tuple(
            self[k] if k not in ("text_model_output", "audio_model_output") else getattr(self, k).to_tuple()
            for k in self.keys()
        )


def sincos_position_table(embed_dim: int, frequency_patches: int, time_patches: int) -> torch.Tensor:
    """The fixed MAE 2-D sin-cos table [1 + F * T, D] with a zero CLS row.

    Row 1 + f * T + t holds the 1-D table of the time index t in its first half and of the frequency index f in its
    second half; each half is [sin(pos * w) | cos(pos * w)] with w_i = 10000^(-i / (D / 4)), computed in float64.
    """
    if embed_dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs an embedding size divisible by 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)

    def one_dimensional(positions: np.ndarray) -> np.ndarray:
        angles = positions.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    freq_index, time_index = np.meshgrid(np.arange(frequency_patches), np.arange(time_patches), indexing="ij")
    grid = np.concatenate(
        [one_dimensional(time_index.astype(np.float64)), one_dimensional(freq_index.astype(np.float64))], axis=1
    )
    table = np.concatenate([np.zeros((1, embed_dim)), grid], axis=0)
    return torch.from_numpy(table.astype(np.float32))


def resized_position_table(table: torch.Tensor, rows: int, old_columns: int, new_columns: int) -> torch.Tensor:
    """The original's EVAR resize: the patch rows of [1, 1 + rows * old, D] bicubically resized to `new_columns`
    (align_corners False, no antialias), the CLS row kept."""
    grid = table[:, 1:].reshape(1, rows, old_columns, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(rows, new_columns), mode="bicubic", align_corners=False)
    return torch.cat([table[:, :1], grid.permute(0, 2, 3, 1).reshape(1, rows * new_columns, -1)], dim=1)


def frame_timestamps(num_samples: int, num_frames: int, sampling_rate: int = 16000) -> np.ndarray:
    """Times in ms of the `num_frames` frame features of a clip of `num_samples` samples (frame starts).

    As the original: step = (num_samples / sampling_rate) / num_frames * 1000 ms (10 s → 161.29 ms), times i * step
    computed in float64 and returned as float32.
    """
    step = (num_samples / sampling_rate) / num_frames * 1000.0
    return (np.arange(num_frames, dtype=np.float64) * step).astype(np.float32)


def lead_token_attention_mask(
    config: M2D2AudioConfig | M2D2Config, hidden_states: torch.Tensor, token_mask: torch.Tensor
) -> torch.Tensor:
    """The attention mask of `[lead token, tokens...]` sequences (CLS or semantic token first, always attended) in
    which only the tokens where `token_mask` is True may be attended to."""
    key_mask = torch.cat([token_mask.new_ones(token_mask.shape[0], 1), token_mask], dim=1)
    return create_bidirectional_mask(config=config, inputs_embeds=hidden_states, attention_mask=key_mask)


def record_clip_tokens(layout: ChunkLayout, hidden_states: torch.Tensor, recorded: list[torch.Tensor]) -> torch.Tensor:
    """Appends the per-clip tokens of packed `[chunks, 1 + tokens, D]` states to `recorded` and returns the packed
    states rebuilt from them, so that the next layer computes from the recorded tensor: gradients then reach the
    returned `hidden_states` (`retain_grad`, attributions). The real tokens are copied unchanged; padding tokens of
    narrow chunks become zero, which no real token attends to."""
    clip_tokens = layout.unpack_tokens(hidden_states[:, 1:])
    recorded.append(clip_tokens)
    flat = clip_tokens.new_zeros(hidden_states.shape[0] * (hidden_states.shape[1] - 1), hidden_states.shape[-1])
    real = layout.token_mask
    flat = flat.index_put((layout.token_index[real],), clip_tokens[real])
    return torch.cat([hidden_states[:, :1], flat.view(hidden_states.shape[0], -1, hidden_states.shape[-1])], dim=1)


def all_real(mask: torch.Tensor | None) -> bool:
    """True when `mask` is None or all ones: nothing to mask out, so the unpadded (exportable) path applies.

    torch.export cannot branch on tensor values: while exporting, a given mask is instead asserted to be all ones
    when the exported program runs (exported programs have no ragged path; encode ragged batches eagerly)."""
    if mask is None:
        return True
    if torch.compiler.is_exporting():
        torch._assert_async(
            mask.bool().all(), "exported M2D2 programs take unpadded batches only: a mask with zeros needs eager mode"
        )
        return True
    return bool(mask.bool().all())


def contrastive_loss(logits_per_audio: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a square similarity matrix whose matching pairs lie on the diagonal."""
    labels = torch.arange(logits_per_audio.shape[0], device=logits_per_audio.device)
    return (F.cross_entropy(logits_per_audio, labels) + F.cross_entropy(logits_per_audio.t(), labels)) / 2


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, N, D] over the positions where `mask` [B, N] is true."""
    weights = mask.to(values.dtype)[..., None]
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1)


def frame_counts_from_mask(input_features_mask: torch.Tensor) -> torch.Tensor:
    """Frames per clip [B] of an `input_features_mask` [B, T], which must be 1s for the real frames then 0s.

    The encoder reads each clip as its first `count` frames, so any other mask (values other than 0/1, a 0 before
    a 1) would silently encode other frames than the ones it marks: it is rejected.
    """
    # Checked before the cast to integers: a float mask of 0.9999999 or 1e-8 would truncate to 0 and pass.
    if ((input_features_mask != 0) & (input_features_mask != 1)).any():
        values = sorted(set(torch.unique(input_features_mask).tolist()) - {0, 1})[:5]
        raise ValueError(
            f"input_features_mask must hold 0 and 1 only (1 = real frame), got values {values}: pass the mask "
            f"M2D2FeatureExtractor returns."
        )
    mask = input_features_mask.to(torch.long)
    holes = (mask[:, 1:] > mask[:, :-1]).any(-1)
    if holes.any():
        clip = int(holes.nonzero()[0, 0])
        raise ValueError(
            f"input_features_mask of clip {clip} has a 0 before a 1: the mask must mark each clip's real frames as "
            f"one run from its start (1s, then 0s for batch padding). To leave out a middle part, cut the audio "
            f"and encode the parts as separate clips."
        )
    return mask.sum(-1)


def all_real_output(tokens: torch.Tensor, frame_features: torch.Tensor) -> M2D2AudioModelOutput:
    """The outputs of a batch whose tokens and frames are all real (the unpadded paths): masks of ones."""
    frame_mask = torch.ones(frame_features.shape[:2], dtype=torch.long, device=frame_features.device)
    return M2D2AudioModelOutput(
        last_hidden_state=tokens,
        token_mask=torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device),
        frame_features=frame_features,
        frame_mask=frame_mask,
        pooler_output=masked_mean(frame_features, frame_mask),
    )


class M2D2PatchEmbeddings(nn.Module):
    """Non-overlapping patches of the log-mel ([B, F, W] → [B, rows * columns, D], frequency-major)."""

    def __init__(self, config: M2D2AudioConfig):
        super().__init__()
        self.projection = nn.Conv2d(1, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        patches = self.projection(log_mel.unsqueeze(1).to(self.projection.weight.dtype))
        return patches.flatten(2).transpose(1, 2)


class M2D2Embeddings(nn.Module):
    """Patch embedding plus the fixed positional table; the CLS token is kept apart because pre-training drops
    masked patches between adding positions and prepending CLS."""

    def __init__(self, config: M2D2AudioConfig):
        super().__init__()
        self.config = config
        self.patch_embeddings = M2D2PatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        # A persistent buffer: stored with the weights (converted checkpoints carry tables that are not the
        # formula's, e.g. the 2025 release's bicubically resized one) and never trained.
        # Built from the formula here already, so that a model whose weights were never initialised (meta-device
        # construction, `from_pretrained` of a folder without the table) holds the same table as `_init_weights`.
        self.register_buffer(
            "position_embeddings",
            sincos_position_table(config.hidden_size, config.frequency_patches, config.time_patches)[None],
            persistent=True,
        )

    def forward(self, log_mel: torch.Tensor) -> torch.Tensor:
        """[N, F, W] chunks → [N, rows * columns, D]; narrow chunks use the table's first columns (no
        interpolation)."""
        patches = self.patch_embeddings(log_mel)
        rows = self.config.frequency_patches
        columns = patches.shape[1] // rows
        if columns > self.config.time_patches:
            raise ValueError(
                f"a chunk of {columns} patch columns exceeds the positional grid ({self.config.time_patches}); "
                f"inputs longer than chunk_frames={self.config.chunk_frames} must be chunked"
            )
        table = self.position_embeddings[:, 1:].reshape(1, rows, self.config.time_patches, -1)[:, :, :columns]
        return patches + table.reshape(1, rows * columns, -1).to(patches.dtype)

    def cls_embedding(self) -> torch.Tensor:
        return self.cls_token + self.position_embeddings[:, :1]


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    # In place: the score tensor is the largest activation (B x heads x L x L), and neither the matmul's nor the
    # additions' backward needs it.
    attn_weights = torch.matmul(query, key.transpose(2, 3)).mul_(scaling)
    if attention_mask is not None:
        attn_weights.add_(attention_mask)
    # ATen's softmax accumulates bf16 / fp16 inputs in float32 and rounds once, as an explicit float32 upcast would,
    # without the float32 copy (in bf16 on CPU that makes eager attention faster than SDPA).
    attn_weights = nn.functional.softmax(attn_weights, dim=-1)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class M2D2Attention(nn.Module):
    """Multi-head self-attention with one fused query/key/value projection (split [q, k, v] × heads × head_dim)."""

    def __init__(self, config, hidden_size: int, num_attention_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.config = config
        self.num_attention_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=qkv_bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def project_qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values `[B, heads, L, head_dim]` of `hidden_states` `[B, L, hidden_size]`."""
        batch, length, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_attention_heads, self.head_dim)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def attend(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        num_queries: int | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The heads' outputs concatenated, `[B, L, hidden_size]`, before the output projection, and the attention
        weights (eager attention only). `num_queries`: only the first positions attend (to all), `[B, num_queries,
        hidden_size]`."""
        batch, length, _ = hidden_states.shape
        query, key, value = self.project_qkv(hidden_states)
        if num_queries is not None:
            length, query = num_queries, query[:, :, :num_queries]
            if attention_mask is not None:
                attention_mask = attention_mask[:, :, :num_queries]
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
        )
        return attn_output.reshape(batch, length, -1), attn_weights

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        heads, attn_weights = self.attend(hidden_states, attention_mask, **kwargs)
        return self.proj(heads), attn_weights


class M2D2MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.activation_fn = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(hidden_states)))


class M2D2Layer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)).

    Sizes are explicit because the encoder (768/12 heads), the M2D predictor (512/16) and the semantic projector
    (768/1 head, MLP 768, eps 1e-5) share this block.
    """

    def __init__(
        self,
        config,
        hidden_size: int,
        num_attention_heads: int,
        intermediate_size: int,
        layer_norm_eps: float,
        hidden_act: str = "gelu",
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.attention = M2D2Attention(config, hidden_size, num_attention_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.mlp = M2D2MLP(hidden_size, intermediate_size, hidden_act)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(self.norm1(hidden_states), attention_mask, **kwargs)[0]
        return hidden_states + self.mlp(self.norm2(hidden_states))

    def lead_token_forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`forward(hidden_states, attention_mask)[:, :1]` computed for the first position alone: its query against
        every position's key and value, then the MLP on it only."""
        heads, _ = self.attention.attend(self.norm1(hidden_states), attention_mask, num_queries=1)
        return self.lead_token_output(hidden_states[:, :1], heads)

    def lead_token_output(self, lead: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """The rest of the block at the lead position, given its input `lead` and its attended heads `heads` (before
        the output projection): the projection, the MLP and both residuals of `forward`."""
        lead = lead + self.attention.proj(heads)
        return lead + self.mlp(self.norm2(lead))


def encoder_layers(config: M2D2AudioConfig) -> nn.ModuleList:
    """The ViT blocks of the audio encoder (the online encoder and the EMA target of pre-training alike)."""
    return nn.ModuleList(
        M2D2Layer(
            config,
            config.hidden_size,
            config.num_attention_heads,
            config.intermediate_size,
            config.layer_norm_eps,
            config.hidden_act,
            config.qkv_bias,
        )
        for _ in range(config.num_hidden_layers)
    )


class M2D2PreTrainedModel(PreTrainedModel):
    config: M2D2AudioConfig
    base_model_prefix = "audio_model"
    main_input_name = "input_features"
    input_modalities = ("audio",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["M2D2Embeddings", "M2D2Layer"]
    _supports_sdpa = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' `from_pretrained`; weights stored in float16 (the shipped demo, stored so for size: CPU
        kernels compute float16 slowly) compute in float32 unless a torch dtype is asked for. Other stored dtypes
        load as transformers loads them (`"auto"`: as stored)."""
        asked = kwargs.get("dtype", kwargs.get("torch_dtype"))
        model = super().from_pretrained(*args, **kwargs)
        loaded = model[0] if isinstance(model, tuple) else model
        if asked in (None, "auto") and loaded.dtype == torch.float16:
            loaded.to(torch.float32)
            for config in (loaded.config, *(getattr(loaded.config, key) for key in loaded.config.sub_configs)):
                config.dtype = torch.float32
        return model

    def save_pretrained(self, *args, **kwargs):
        """transformers' `save_pretrained`; the saved folder carries an `auto_map`, the model's config is left as
        it was (its `to_dict()` does not change by saving)."""
        with auto_map_kept_on_disk_only(self.config):
            return super().save_pretrained(*args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """M2D's initialisation: xavier-uniform Linear (and patch projection as a Linear), zero biases, unit
        LayerNorm, N(0, 0.02) tokens and the fixed sin-cos positional table.

        transformers skips, for code outside its tree, modules that hold no parameters of their own, so every
        rule here is keyed on a module that owns the tensors it sets."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.xavier_uniform_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):  # the patch projection, initialised as the Linear it is
            fan_in, fan_out = module.weight[0].numel(), module.weight.shape[0]
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            init.uniform_(module.weight, -bound, bound)
            init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):  # the classifier's head norm and its statistics
            if module.affine:
                init.ones_(module.weight)
                init.zeros_(module.bias)
            if module.track_running_stats:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, M2D2Embeddings):
            audio = module.config
            init.normal_(module.cls_token, std=std)
            init.copy_(
                module.position_embeddings,
                sincos_position_table(audio.hidden_size, audio.frequency_patches, audio.time_patches)[None],
            )
        elif isinstance(module, M2D2SemanticProjector):
            init.zeros_(module.sem_token)
        elif isinstance(module, M2D2ClapModel):
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class M2D2AudioModel(M2D2PreTrainedModel):
    """The M2D ViT audio encoder: normalised log-mel → patch tokens, frame features and a clip embedding.

    Inputs longer than `config.chunk_frames` are cut into chunks that are encoded independently (as the original
    runtime does); all chunks of all clips of a batch go through the encoder in one batched pass.
    """

    # `output_attentions=True` records each encoder layer's attention weights (transformers' output capturing);
    # the hidden states keep their per-clip layout and are collected by `forward` itself.
    _can_record_outputs = {"attentions": OutputRecorder(M2D2Attention, index=1, layer_name="layers")}

    # Without gradients no activation outlives its pass, so the chunks of long inputs go through the encoder this
    # many at a time (None: all at once). An hour's 360 chunks in one pass peaked 1.1 GB higher (bf16 CLAP tuned
    # for the CPU, AMD EPYC: 4235 against 3151 MB); 64 chunks (about 20k tokens) keep the matmuls as large as the
    # CPU kernels need. Training, hidden states and attention weights keep the single pass.
    inference_chunks_per_pass: int | None = 64

    # The parts of a CLAP folder beside its audio tower (`audio_model.*`): loading the tower alone from such a folder
    # leaves them out by design, so the load report does not list them as unexpected.
    _clap_only_keys = re.compile(r"^(text_model|text_projection|audio_projection)\.|^logit_scale$")

    def __init__(self, config: M2D2AudioConfig):
        super().__init__(config)
        self.embeddings = M2D2Embeddings(config)
        self.layers = encoder_layers(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def _adjust_missing_and_unexpected_keys(self, loading_info) -> None:
        # An override, not `_keys_to_ignore_on_load_unexpected`: transformers copies that attribute from children to
        # parents, and a CLAP model must keep reporting unexpected text-tower keys of its own.
        super()._adjust_missing_and_unexpected_keys(loading_info)
        loading_info.unexpected_keys = {
            key for key in loading_info.unexpected_keys if self._clap_only_keys.search(key) is None
        }

    def save_pretrained(self, *args, **kwargs):
        """An encoder folder: the online encoder of [`M2D2ForPreTraining`] shares that model's pre-training
        config and saves only its encoder fields."""
        shared = self.config
        self.config = shared.encoder_config() if type(shared) is not M2D2AudioConfig else shared
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self.config = shared

    def get_input_embeddings(self) -> M2D2PatchEmbeddings:
        return self.embeddings.patch_embeddings

    def get_position_embeddings(self) -> torch.Tensor:
        """The positional table `[1, 1 + frequency_patches * time_patches, hidden_size]` (CLS row first)."""
        return self.embeddings.position_embeddings

    @torch.no_grad()
    def resize_position_embeddings(self, chunk_frames: int, method: Literal["sincos", "bicubic"] = "sincos") -> None:
        """Sets the positional grid to chunks of `chunk_frames` frames (e.g. 608 → 1001 to fine-tune on longer
        crops) and `config.chunk_frames` with it. `"sincos"` recomputes the fixed 2-D sin-cos table for the new grid
        (the table pre-training uses); `"bicubic"` resizes the stored table as the original EVAR loader does (the
        2025 release's 5x62 table is its 5x38 one resized so)."""
        if method not in ("sincos", "bicubic"):
            raise ValueError(f"method must be 'sincos' or 'bicubic', got {method!r}")
        config = self.config
        if chunk_frames < config.patch_size[1]:
            raise ValueError(f"chunk_frames ({chunk_frames}) is shorter than one patch ({config.patch_size[1]})")
        stored = self.embeddings.position_embeddings
        rows, columns = config.frequency_patches, chunk_frames // config.patch_size[1]
        if method == "sincos":
            table = sincos_position_table(config.hidden_size, rows, columns)[None]
        else:
            table = resized_position_table(stored, rows, config.time_patches, columns)
        self.embeddings.position_embeddings = table.to(device=stored.device, dtype=stored.dtype)
        config.chunk_frames = chunk_frames

    def _check_inputs(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Validates the inputs; returns the per-clip frame counts of a given mask (None without one, or while
        exporting, where the mask is asserted all ones instead)."""
        if input_features.dim() != 3 or input_features.shape[1] != self.config.num_mel_bins:
            raise ValueError(
                f"input_features must be [batch, {self.config.num_mel_bins} mel bins, frames], got "
                f"{tuple(input_features.shape)}: use M2D2FeatureExtractor to make them from waveforms"
            )
        if input_features_mask is not None and input_features_mask.shape != (
            input_features.shape[0],
            input_features.shape[2],
        ):
            raise ValueError(
                f"input_features_mask must be [batch, frames] = {(input_features.shape[0], input_features.shape[2])}, "
                f"got {tuple(input_features_mask.shape)}"
            )
        if input_features_mask is None or torch.compiler.is_exporting():
            return None
        # Checked before the unpadded path too, which would otherwise take a mask of 2s as all real.
        return frame_counts_from_mask(input_features_mask)

    def chunk_layout(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None) -> tuple:
        """Validates the input and plans its chunks; returns (layout, per-clip frame counts)."""
        return self._plan_chunks(input_features, self._check_inputs(input_features, input_features_mask))

    def _plan_chunks(self, input_features: torch.Tensor, lengths: torch.Tensor | None) -> tuple:
        """(layout, per-clip frame counts) for validated inputs; `lengths` None: every clip has all frames."""
        if lengths is None:
            batch, _, frames = input_features.shape
            lengths = torch.full((batch,), frames, dtype=torch.long, device=input_features.device)
        layout = ChunkLayout.from_lengths(
            lengths.tolist(),
            self.config.chunk_frames,
            self.config.patch_size[1],
            self.config.frequency_patches,
            device=input_features.device,
        )
        return layout, lengths

    def _encode_chunks(
        self,
        chunks: torch.Tensor,
        token_mask: torch.Tensor | None,
        record: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """[N, F, W] chunks → normalised patch tokens [N, F * C, D], CLS dropped. `token_mask` [N, F * C]: the tokens
        that may be attended to (None: all). `record`, if given, sees the states after the embeddings and after each
        layer and returns the states the next layer computes from (see `record_clip_tokens`)."""
        per_pass = self.inference_chunks_per_pass
        # The number of chunks is read last: traced programs keep it symbolic.
        if (
            per_pass is None
            or record is not None
            or kwargs.get("output_attentions", self.config.output_attentions)
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.compiler.is_exporting()
            or chunks.shape[0] <= per_pass
        ):
            return self._encode_chunk_pass(chunks, token_mask, record, **kwargs)
        tokens = None
        for start in range(0, chunks.shape[0], per_pass):
            end = start + per_pass
            part_mask = None if token_mask is None else token_mask[start:end]
            part = self._encode_chunk_pass(chunks[start:end], part_mask, **kwargs)
            if tokens is None:
                tokens = part.new_empty(chunks.shape[0], *part.shape[1:])
            tokens[start:end] = part
        return tokens

    def _encode_chunk_pass(
        self,
        chunks: torch.Tensor,
        token_mask: torch.Tensor | None,
        record: Callable[[torch.Tensor], torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """`_encode_chunks` in one pass of the encoder over all the chunks."""
        patches = self.embeddings(chunks)
        cls = self.embeddings.cls_embedding().expand(patches.shape[0], -1, -1).to(patches.dtype)
        hidden_states = torch.cat([cls, patches], 1)
        attention_mask = None
        if token_mask is not None:
            attention_mask = lead_token_attention_mask(self.config, hidden_states, token_mask)
        if record is not None:
            hidden_states = record(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask, **kwargs)
            if record is not None:
                hidden_states = record(hidden_states)
        return self.layernorm(hidden_states)[:, 1:]

    @capture_outputs
    def forward(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> M2D2AudioModelOutput:
        r"""
        input_features (`torch.FloatTensor` of shape `(batch_size, num_mel_bins, frames)`):
            Normalised log-mel from [`M2D2FeatureExtractor`]; any length (long inputs are chunked).
        input_features_mask (`torch.Tensor` of shape `(batch_size, frames)`, *optional*):
            1 for real frames, 0 for batch padding; each clip is encoded from its own frames only.
        output_hidden_states (`bool`, *optional*):
            Also return the tokens after the embeddings and after every layer.
        output_attentions (`bool`, *optional*):
            Also return every layer's attention weights (eager attention; see [`M2D2AudioModelOutput`]).
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        output_attentions = kwargs.get("output_attentions", self.config.output_attentions)
        lengths = self._check_inputs(input_features, input_features_mask)
        # The unpadded path encodes full and last chunks in separate passes, so per-clip hidden states and
        # attentions come from the packed path (an exported program returns neither).
        if all_real(input_features_mask) and not (output_hidden_states or output_attentions):
            return self._forward_unpadded(input_features, **kwargs)

        layout, lengths = self._plan_chunks(input_features, lengths)
        chunks = layout.pack(input_features, lengths, self.config.patch_size[1])
        token_mask = None if layout.is_uniform else layout.token_padding_mask()
        all_hidden_states = [] if output_hidden_states else None
        record = partial(record_clip_tokens, layout, recorded=all_hidden_states) if output_hidden_states else None
        chunk_tokens = self._encode_chunks(chunks, token_mask, record, **kwargs)
        frame_features = layout.unpack_frames(chunk_tokens)
        return M2D2AudioModelOutput(
            last_hidden_state=layout.unpack_tokens(chunk_tokens),
            token_mask=layout.token_mask.long(),
            frame_features=frame_features,
            frame_mask=layout.frame_mask.long(),
            pooler_output=masked_mean(frame_features, layout.frame_mask),
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )

    def _forward_unpadded(self, input_features: torch.Tensor, **kwargs) -> M2D2AudioModelOutput:
        """Equal-length clips, every frame real: the full chunks and the last chunks are encoded in two passes
        without masks (what the packed path computes, in the original's chunk-by-chunk form), with shapes that
        torch.export traces symbolically (a symbolic number of frames: see `_forward_padded_chunks`)."""
        if torch.compiler.is_exporting() and isinstance(input_features.shape[2], torch.SymInt):
            return self._forward_padded_chunks(input_features, **kwargs)
        chunks = EqualLengthChunks.split(
            input_features, self.config.chunk_frames, self.config.patch_size[1], self.config.frequency_patches
        )
        last_tokens = self._encode_chunks(chunks.last, None, **kwargs)
        if chunks.full.shape[0] == 0:  # clips of one chunk (attention kernels reject empty batches)
            full_tokens = last_tokens[:0]
        else:
            full_tokens = self._encode_chunks(chunks.full, None, **kwargs)
        return all_real_output(
            chunks.merge_tokens(full_tokens, last_tokens), chunks.merge_frames(full_tokens, last_tokens)
        )

    def _forward_padded_chunks(self, input_features: torch.Tensor, **kwargs) -> M2D2AudioModelOutput:
        """`_forward_unpadded` for a time axis that torch.export keeps symbolic: every chunk at the full width in one
        pass, the last chunk's padding columns masked out of attention and dropped from the outputs (the same real
        tokens, to float rounding; no size is a floor division of the number of frames)."""
        chunks = PaddedChunks.split(
            input_features, self.config.chunk_frames, self.config.patch_size[1], self.config.frequency_patches
        )
        encoded = self._encode_chunks(chunks.chunks, chunks.token_mask(), **kwargs)
        return all_real_output(chunks.merge_tokens(encoded), chunks.merge_frames(encoded))

    def encode_visible(
        self,
        patches: torch.Tensor,
        visible_indices: torch.Tensor,
        visible_mask: torch.Tensor | None = None,
        hidden_states_out: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Encodes only some patches of one-chunk inputs, as masked training does.

        Args:
            patches: `self.embeddings(input_features)` of inputs of at most `chunk_frames` frames: the patch
                embeddings with their positions, added before the other patches are dropped.
            visible_indices: [B, V] patches to keep (patch p = f * columns + t).
            visible_mask: [B, V] optional; False marks kept patches that no token may attend to (crop padding past
                a short clip's end), as the inference forward never sees such patches. None: all attend (the
                original training).
            hidden_states_out: a list to which the `[B, 1 + V, D]` tokens after the embeddings and after every layer
                (before the final LayerNorm) are appended (pre-training's `output_hidden_states`); None: not kept.

        Returns:
            [B, 1 + V, D] normalised outputs: CLS first, then the visible tokens in `visible_indices` order.
        """
        visible = patches.gather(1, visible_indices[..., None].expand(-1, -1, patches.shape[-1]))
        cls = self.embeddings.cls_embedding().to(patches.dtype).expand(len(patches), -1, -1)
        hidden_states = torch.cat([cls, visible], dim=1)
        attention_mask = None
        if visible_mask is not None and not bool(visible_mask.all()):
            attention_mask = lead_token_attention_mask(self.config, hidden_states, visible_mask)
        if hidden_states_out is not None:
            hidden_states_out.append(hidden_states)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask)
            if hidden_states_out is not None:
                hidden_states_out.append(hidden_states)
        return self.layernorm(hidden_states)

    def timestamp_embeddings(self, outputs: M2D2AudioModelOutput) -> torch.Tensor:
        """[B, frames, hidden_size]: per frame, the mean of its frequency-row tokens (HEAR timestamp embeddings)."""
        batch, frames, _ = outputs.frame_features.shape
        rows = self.config.frequency_patches
        return outputs.frame_features.reshape(batch, frames, rows, -1).mean(2)

    def embed_long_audio(self, audio, sampling_rate: int | None = None, **kwargs) -> M2D2LongAudioOutput:
        """Encodes one long recording (minutes to hours; an array or an audio file's path) window by window with
        bounded memory: the log-mel and the encoder run over `chunks_per_window` chunks at a time, with the same
        outputs as the whole-clip forward. See [`m2d2_hf.long_audio.embed_long_audio`] for the arguments."""
        return embed_long_audio(self, audio, sampling_rate, **kwargs)


class M2D2ForAudioClassification(M2D2PreTrainedModel):
    """The audio encoder with EVAR's classification head (stage 1.1 fine-tuning): the mean of the patch tokens →
    BatchNorm1d without affine parameters → Linear. Multi-label problems (AudioSet) use a sigmoid with BCE, single-
    label ones a softmax with cross-entropy (`config.problem_type`)."""

    def __init__(self, config: M2D2AudioConfig):
        super().__init__(config)
        self.audio_model = M2D2AudioModel(config)
        self.head_norm = nn.BatchNorm1d(config.hidden_size, affine=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if module is self.classifier:  # EVAR's head initialisation
            init.normal_(module.weight, std=0.01)
            init.zeros_(module.bias)
        else:
            super()._init_weights(module)

    @can_return_tuple
    def forward(
        self,
        input_features: torch.Tensor,
        input_features_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        visible_indices: torch.Tensor | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        r"""
        input_features, input_features_mask: [`M2D2FeatureExtractor`]'s output (any length; chunked as the base model).
        labels (`torch.Tensor`, *optional*): class indices [B] (single-label) or multi-hot [B, num_labels].
        visible_indices (`torch.LongTensor` of shape `(batch_size, num_visible)`, *optional*): encode only these
            patches of one-chunk inputs (the structured patch masking of fine-tuning); all tokens otherwise.
        """
        if visible_indices is not None:
            pooled = self.audio_model.encode_visible(self.audio_model.embeddings(input_features), visible_indices)[
                :, 1:
            ].mean(1)
            hidden_states = attentions = None
        else:
            outputs = self.audio_model(input_features, input_features_mask, **kwargs)
            pooled = masked_mean(outputs.last_hidden_state, outputs.token_mask)
            hidden_states, attentions = outputs.hidden_states, outputs.attentions
        logits = self.classifier(self.head_norm(pooled))
        loss = None
        if labels is not None:
            if self.config.problem_type == "multi_label_classification" or labels.dim() == 2:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)


class M2D2SemanticProjector(nn.Module):
    """AudioToSemantic (2025): a learned token attends over all patch tokens through transformer blocks without
    positional information (so the result ignores token order), then a LayerNorm. Its geometry comes from the
    config's `projector_*` fields (the CLAP config at inference, the audio config in stage-1 pre-training)."""

    def __init__(self, config: M2D2Config | M2D2AudioConfig, hidden_size: int):
        super().__init__()
        self.config = config
        dim = hidden_size
        self.sem_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.layers = nn.ModuleList(
            M2D2Layer(
                config,
                dim,
                config.projector_num_attention_heads,
                config.projector_intermediate_size,
                config.projector_layer_norm_eps,
            )
            for _ in range(config.projector_num_layers)
        )
        self.layernorm = nn.LayerNorm(dim, eps=config.projector_layer_norm_eps)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = torch.cat([self.sem_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        attention_mask = None
        if not all_real(token_mask):
            attention_mask = lead_token_attention_mask(self.config, hidden_states, token_mask)
        for layer in self.layers[:-1]:
            hidden_states = layer(hidden_states, attention_mask)
        # Only the learned token's output is read, so the last block computes that position alone: linear instead
        # of quadratic in the number of tokens (an hour's 111k tokens ran out of memory under eager attention).
        return self.layernorm(self.layers[-1].lead_token_forward(hidden_states, attention_mask)[:, 0])

    def streaming_pooler(self) -> "M2D2ProjectorStream":
        """This projector fed the patch tokens of one long recording a window at a time (`add`), giving at `finish`
        what `forward` gives on all of them: with one block (the released geometry) an online softmax of the learned
        token's attention, so the tokens themselves are never held; with more blocks, the tokens collected."""
        return M2D2SemanticTokenAttention(self) if len(self.layers) == 1 else M2D2ProjectorStream(self)


class M2D2MLPProjector(nn.Module):
    """The 2024 projector: mean of the patch tokens → Linear → ReLU → Linear."""

    def __init__(self, hidden_size: int, intermediate_size: int, output_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, output_size)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = tokens.mean(1) if token_mask is None else masked_mean(tokens, token_mask)
        return self.fc2(F.relu(self.fc1(pooled)))

    def streaming_pooler(self) -> "M2D2ProjectorStream":
        """This projector fed the patch tokens of one long recording a window at a time: their mean accumulated."""
        return M2D2TokenMean(self)


class M2D2ProjectorStream:
    """An audio projector fed the patch tokens `[n, hidden_size]` of one recording in windows (`add`); `finish`
    returns `projector(all_tokens[None])` `[1, projection_dim]`. This base class collects the tokens."""

    def __init__(self, projector: nn.Module):
        self.projector = projector
        self.tokens: list[torch.Tensor] = []

    def add(self, tokens: torch.Tensor) -> None:
        self.tokens.append(tokens)

    def finish(self) -> torch.Tensor:
        return self.projector(torch.cat(self.tokens)[None])


class M2D2TokenMean(M2D2ProjectorStream):
    """`M2D2MLPProjector` streamed: the token mean accumulated in float64; its MLP runs once at the end."""

    def __init__(self, projector: "M2D2MLPProjector"):
        super().__init__(projector)
        self.sum, self.count = None, 0

    def add(self, tokens: torch.Tensor) -> None:
        window_sum = tokens.sum(0, dtype=torch.float64)
        self.sum = window_sum if self.sum is None else self.sum + window_sum
        self.count += len(tokens)

    def finish(self) -> torch.Tensor:
        dtype = self.projector.fc1.weight.dtype
        return self.projector((self.sum / self.count).to(dtype)[None, None])  # the mean of one token is itself


class M2D2SemanticTokenAttention(M2D2ProjectorStream):
    """A one-block `M2D2SemanticProjector` streamed. Only the learned token's output is read, so its block needs the
    token's query against the keys and values of all patch tokens: these are folded window by window into an online
    softmax (running maximum, sum and weighted value sum, in float64); `finish` then runs the rest of the block
    (output projection, MLP, the two residuals of `M2D2Layer.forward`) and the final LayerNorm on the token alone."""

    def __init__(self, projector: M2D2SemanticProjector):
        super().__init__(projector)
        self.layer = projector.layers[0]
        attention = self.layer.attention
        self.scaling = attention.scaling
        self.token = projector.sem_token[0]  # [1, D]
        query, _, _ = attention.project_qkv(self.layer.norm1(self.token)[None])
        self.query = query[0].double()  # [heads, 1, head_dim]
        state = {"dtype": torch.float64, "device": self.token.device}
        self.max = torch.full((attention.num_attention_heads, 1, 1), -torch.inf, **state)
        self.denominator = torch.zeros((attention.num_attention_heads, 1, 1), **state)
        self.numerator = torch.zeros((attention.num_attention_heads, 1, attention.head_dim), **state)
        self.add(self.token)  # the learned token attends to itself too

    def add(self, tokens: torch.Tensor) -> None:
        _, key, value = self.layer.attention.project_qkv(self.layer.norm1(tokens)[None])
        key, value = key[0].double(), value[0].double()  # [heads, n, head_dim]
        scores = self.query @ key.transpose(1, 2) * self.scaling  # [heads, 1, n]
        new_max = torch.maximum(self.max, scores.amax(-1, keepdim=True))
        rescale = torch.exp(self.max - new_max)
        weights = torch.exp(scores - new_max)
        self.denominator = self.denominator * rescale + weights.sum(-1, keepdim=True)
        self.numerator = self.numerator * rescale + weights @ value
        self.max = new_max

    def finish(self) -> torch.Tensor:
        # Heads side by side, as `M2D2Attention.forward` concatenates them.
        attended = (self.numerator / self.denominator).to(self.token.dtype).reshape(1, -1)
        return self.projector.layernorm(self.layer.lead_token_output(self.token, attended))


class M2D2ClapModel(M2D2PreTrainedModel):
    """M2D2 (M2D-CLAP 2025): the M2D audio encoder with an audio projector, a transformers text tower, and a
    learned temperature, embedding audio and text in one space."""

    config: M2D2Config
    base_model_prefix = "m2d2"
    # The first argument of `forward`, as transformers' ClapModel (the audio towers' main input stays input_features).
    main_input_name = "input_ids"
    input_modalities = ("audio", "text")
    _no_split_modules = ["M2D2Embeddings", "M2D2Layer"]

    def __init__(self, config: M2D2Config):
        super().__init__(config)
        self.audio_model = M2D2AudioModel._from_config(config.audio_config)
        audio_size = config.audio_config.hidden_size
        if config.audio_projector_type == "semantic":
            self.audio_projection = M2D2SemanticProjector(config, audio_size)
        else:
            self.audio_projection = M2D2MLPProjector(
                audio_size, config.projector_intermediate_size, config.projection_dim
            )
        self.text_model = AutoModel.from_config(config.text_config)
        self.text_projection = (
            nn.Linear(config.text_config.hidden_size, config.projection_dim)
            if config.text_projection
            else nn.Identity()
        )
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.set_input_embeddings(value)

    @can_return_tuple
    def get_audio_features(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None, **kwargs
    ) -> M2D2AudioModelOutput:
        """The audio tower's output with `pooler_output` replaced by the L2-normalised CLAP audio embedding."""
        audio_outputs = self.audio_model(input_features, input_features_mask, **kwargs)
        embedding = self.audio_projection(audio_outputs.last_hidden_state, audio_outputs.token_mask)
        audio_outputs.pooler_output = F.normalize(embedding, dim=-1)
        return audio_outputs

    def embed_long_audio(self, audio, sampling_rate: int | None = None, **kwargs) -> M2D2LongAudioOutput:
        """Encodes one long recording (minutes to hours; an array or an audio file's path) window by window with
        bounded memory, returning its clip embedding, CLAP `audio_embeds` and optionally frame features, equal to
        `get_audio_features` on the whole clip. See [`m2d2_hf.long_audio.embed_long_audio`] for the arguments."""
        return embed_long_audio(self, audio, sampling_rate, **kwargs)

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """The text tower's output with `pooler_output` replaced by the L2-normalised CLAP text embedding."""
        text_kwargs = {"attention_mask": attention_mask, **kwargs}
        if token_type_ids is not None:
            text_kwargs["token_type_ids"] = token_type_ids
        text_outputs = self.text_model(input_ids=input_ids, **text_kwargs)
        hidden = text_outputs.last_hidden_state
        if self.config.text_pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            pooled = masked_mean(hidden, mask.bool())
        text_outputs.pooler_output = F.normalize(self.text_projection(pooled), dim=-1)
        return text_outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> M2D2ClapOutput:
        r"""
        input_ids, attention_mask, token_type_ids: the tokenizer's output for the texts.
        input_features, input_features_mask: [`M2D2FeatureExtractor`]'s output for the audio.
        return_loss (`bool`, *optional*): also return the symmetric contrastive loss (needs equal batch sizes,
            the i-th text describing the i-th clip).
        """
        if input_ids is None or input_features is None:
            raise ValueError(
                "M2D2ClapModel.forward needs both input_ids (texts) and input_features (audio); "
                "use get_text_features / get_audio_features for one modality"
            )
        audio_outputs = self.get_audio_features(input_features, input_features_mask, **kwargs)
        text_outputs = self.get_text_features(input_ids, attention_mask, token_type_ids, **kwargs)
        audio_embeds, text_embeds = audio_outputs.pooler_output, text_outputs.pooler_output
        logits_per_audio = audio_embeds @ text_embeds.t() * self.logit_scale.exp()
        loss = None
        if return_loss:
            if logits_per_audio.shape[0] != logits_per_audio.shape[1]:
                raise ValueError(
                    f"return_loss needs one text per clip, got {logits_per_audio.shape[0]} clips and "
                    f"{logits_per_audio.shape[1]} texts"
                )
            loss = contrastive_loss(logits_per_audio)
        return M2D2ClapOutput(
            loss=loss,
            logits_per_audio=logits_per_audio,
            logits_per_text=logits_per_audio.t(),
            text_embeds=text_embeds,
            audio_embeds=audio_embeds,
            text_model_output=text_outputs,
            audio_model_output=audio_outputs,
        )


__all__ = [
    "M2D2AudioModel",
    "M2D2AudioModelOutput",
    "M2D2ClapModel",
    "M2D2ClapOutput",
    "M2D2ForAudioClassification",
    "M2D2PreTrainedModel",
    "contrastive_loss",
    "frame_timestamps",
    "sincos_position_table",
]
