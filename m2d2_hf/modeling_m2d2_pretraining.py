"""Stage-1 pre-training of M2D2: masked modeling duo (M2D) with an EMA target, plus CLAP against cached caption
embeddings (docs/method.md §5-§6).

The online encoder sees the visible patches and a predictor infers the target encoder's representations of the
masked patches; the target encoder is an exponential moving average of the online one and sees only the masked
patches. A semantic projector of the visible tokens is aligned with projected caption embeddings by a contrastive
loss over the global batch.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_m2d2 import M2D2AudioConfig, M2D2PreTrainingConfig
from .masking import complement_indices, random_unstructured_mask
from .modeling_m2d2 import (
    M2D2Attention,
    M2D2AudioModel,
    M2D2Layer,
    M2D2MLPProjector,
    M2D2PreTrainedModel,
    M2D2SemanticProjector,
    contrastive_loss,
    encoder_layers,
    sincos_position_table,
)


# The temperature is clamped to [0, ln 100] after every optimiser step, as the original does.
MAX_LOGIT_SCALE = 4.605170185988092


@dataclass
class M2D2PreTrainingOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`): `m2d_loss_weight * m2d_loss + clap_loss_weight * clap_loss`.
    m2d_loss (`torch.FloatTensor` of shape `()`): mean over masked patches of 2 - 2 cos(prediction, target).
    clap_loss (`torch.FloatTensor` of shape `()`, *optional*): symmetric contrastive loss over the clips that have a
        caption embedding (gathered from every process); absent without a CLAP head.
    predictions, targets (`torch.FloatTensor` of shape `(batch_size, num_masked, hidden_size)`): predictor output and
        target encoder output (standardised per token) at `masked_indices`.
    audio_embeds, text_embeds (`torch.FloatTensor` of shape `(batch_size, hidden_size)`, *optional*): projector
        outputs of the visible tokens and of the caption embeddings, not normalised.
    visible_indices, masked_indices (`torch.LongTensor`): the patches kept for and hidden from the online encoder.
    hidden_states (`tuple(torch.FloatTensor)`, returned with `output_hidden_states=True`): the online encoder's
        `(batch_size, 1 + num_visible, hidden_size)` tokens (CLS first) after the embeddings and after each layer.
    attentions (`tuple(torch.FloatTensor)`, returned with `output_attentions=True` and eager attention): the online
        encoder's attention weights per layer, `(batch_size, num_heads, 1 + num_visible, 1 + num_visible)`.
    """

    loss: torch.FloatTensor | None = None
    m2d_loss: torch.FloatTensor | None = None
    clap_loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    targets: torch.FloatTensor | None = None
    audio_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    visible_indices: torch.LongTensor | None = None
    masked_indices: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


def m2d_loss(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The M2D objective: standardise each target token (unbiased variance, eps 1e-6), L2-normalise both, and
    average 2 - 2 cos. Returns (loss, standardised targets)."""
    mean = targets.mean(dim=-1, keepdim=True)
    var = targets.var(dim=-1, keepdim=True, unbiased=True)
    targets = (targets - mean) / (var + 1e-6).sqrt()
    cosine = (F.normalize(predictions, dim=-1) * F.normalize(targets, dim=-1)).sum(-1)
    return (2 - 2 * cosine).mean(), targets


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates `tensor` [N_i, ...] from every process; gradients flow back to each process's own slice.
    Processes may hold different N_i (a batch shrinks when undecodable items are skipped)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    world = torch.distributed.get_world_size()
    if world == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    longest = int(max(sizes))
    padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, longest - tensor.shape[0]))
    pieces = torch.distributed.nn.functional.all_gather(padded)
    return torch.cat([piece[: int(n)] for piece, n in zip(pieces, sizes)], dim=0)


def global_clap_loss(
    audio_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Symmetric contrastive loss over the GLOBAL batch (every process's clips; equal per-process batch sizes),
    restricted to clips with a caption (`valid`). Every process computes the same value; with DDP's gradient
    averaging the gradient equals that of the single global loss."""
    audio = gather_with_grad(F.normalize(audio_embeds, dim=-1))
    text = gather_with_grad(F.normalize(text_embeds, dim=-1))
    valid = gather_with_grad(valid.to(torch.uint8)).bool()
    if not bool(valid.any()):
        # No caption anywhere: a zero that keeps the graph (every process must run the same backward).
        return (audio.sum() + text.sum()) * 0.0
    logits = logit_scale.exp() * audio[valid] @ text[valid].t()
    return contrastive_loss(logits)


def check_visible_indices(visible_indices: torch.Tensor, batch: int, num_patches: int) -> None:
    """An explicit mask must name, per clip, the same number of distinct patches in [0, num_patches)."""
    if visible_indices.dim() != 2 or visible_indices.shape[0] != batch:
        raise ValueError(f"visible_indices must be [batch={batch}, num_visible], got {tuple(visible_indices.shape)}")
    if visible_indices.numel() and (int(visible_indices.min()) < 0 or int(visible_indices.max()) >= num_patches):
        raise ValueError(f"visible_indices must lie in [0, {num_patches}) (the patches of the input)")
    ordered = visible_indices.sort(dim=1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("visible_indices repeats a patch within a clip: each visible patch must be listed once")


class M2D2Predictor(nn.Module):
    """The M2D predictor ("decoder"): visible latents and mask tokens, in patch order with a fixed sin-cos table,
    through narrow transformer blocks, projected back to the encoder width."""

    def __init__(self, config: M2D2PreTrainingConfig):
        super().__init__()
        self.config = config
        width = config.predictor_hidden_size
        self.decoder_embed = nn.Linear(config.hidden_size, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        # The formula's table from construction on, as the encoder's (`_init_weights` writes the same values).
        self.register_buffer(
            "position_embeddings",
            sincos_position_table(width, config.frequency_patches, config.time_patches)[None],
        )
        self.layers = nn.ModuleList(
            M2D2Layer(
                config,
                width,
                config.predictor_num_attention_heads,
                config.predictor_intermediate_size,
                config.layer_norm_eps,
                config.hidden_act,
                config.qkv_bias,
            )
            for _ in range(config.predictor_num_hidden_layers)
        )
        self.layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(width, config.hidden_size)

    def forward(
        self, latent: torch.Tensor, visible_indices: torch.Tensor, masked_indices: torch.Tensor
    ) -> torch.Tensor:
        """latent [B, 1 + V, D] (CLS first) → predictions [B, M, D] at `masked_indices`."""
        embedded = self.decoder_embed(latent)
        batch, width = embedded.shape[0], embedded.shape[-1]
        num_patches = visible_indices.shape[1] + masked_indices.shape[1]
        tokens = self.mask_token.to(embedded.dtype).expand(batch, num_patches, width).clone()
        tokens = tokens.scatter(1, visible_indices[..., None].expand(-1, -1, width), embedded[:, 1:])
        table = self.position_embeddings.to(embedded.dtype)
        hidden_states = torch.cat([embedded[:, :1] + table[:, :1], tokens + table[:, 1 : 1 + num_patches]], dim=1)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        predictions = self.decoder_pred(self.layernorm(hidden_states))[:, 1:]
        return predictions.gather(1, masked_indices[..., None].expand(-1, -1, predictions.shape[-1]))


class M2D2ForPreTraining(M2D2PreTrainedModel):
    """Stage-1 M2D2: the online encoder (`audio_model`, an [`M2D2AudioModel`] whose weights export directly), its
    EMA target (blocks and final norm only; patch embedding, positions and CLS are shared with the online encoder),
    the predictor, and, when `config.caption_embedding_size` is set, the CLAP head (semantic projector of the visible
    tokens, `text_projection` of the caption embeddings, `logit_scale`)."""

    config: M2D2PreTrainingConfig
    # `output_attentions=True` returns the online encoder's attentions only (`audio_model` records its own layers);
    # the target encoder, the predictor and the projector are left out.
    _can_record_outputs = {"attentions": OutputRecorder(M2D2Attention, index=1, layer_name="audio_model")}

    def __init__(self, config: M2D2PreTrainingConfig | M2D2AudioConfig):
        # An `M2D2AudioConfig` (an encoder to pre-train further; or, from older versions, one carrying the
        # pre-training fields) becomes the pre-training config of its encoder.
        config = M2D2PreTrainingConfig.from_audio_config(config)
        super().__init__(config)
        # The online encoder shares this config (so attention and output settings reach it); it saves as an
        # encoder folder with the encoder fields only.
        self.audio_model = M2D2AudioModel(config)
        self.target_layers = encoder_layers(config)
        self.target_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.freeze_target()
        self.predictor = M2D2Predictor(config)
        if config.caption_embedding_size:
            if config.audio_projector_type == "semantic":
                self.audio_projection = M2D2SemanticProjector(config, config.hidden_size)
            else:
                self.audio_projection = M2D2MLPProjector(
                    config.hidden_size, config.projector_intermediate_size, config.hidden_size
                )
            self.text_projection = (
                nn.Identity()
                if config.caption_embedding_size == config.hidden_size
                else nn.Linear(config.caption_embedding_size, config.hidden_size)
            )
            self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()
        self.copy_online_to_target()

    def _init_weights(self, module: nn.Module) -> None:
        """The encoder's initialisation, plus the predictor's sin-cos table and mask token, and a target that
        starts as an exact copy of the online encoder (children are initialised before this model itself)."""
        super()._init_weights(module)
        if isinstance(module, M2D2Predictor):
            config = module.config
            init.normal_(module.mask_token, std=config.initializer_range)
            table = sincos_position_table(config.predictor_hidden_size, config.frequency_patches, config.time_patches)
            init.copy_(module.position_embeddings, table[None])
        elif isinstance(module, M2D2ForPreTraining):
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)

    @classmethod
    def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        # A folder without the target (an M2D2AudioModel export) starts it as a copy of the loaded online encoder.
        if any(key.startswith(("target_layers.", "target_layernorm.")) for key in info["missing_keys"]):
            model.copy_online_to_target()
        # transformers' loader re-creates loaded parameters as trainable; the EMA target must stay out of the
        # optimiser and of DDP's gradient bookkeeping.
        model.freeze_target()
        return (model, info) if output_loading_info else model

    @torch.no_grad()
    def copy_online_to_target(self) -> None:
        for target, online in self.target_parameter_pairs():
            target.copy_(online)

    def freeze_target(self) -> None:
        for target, _ in self.target_parameter_pairs():
            target.requires_grad_(False)

    def target_parameter_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(target, online) parameters the EMA ties together."""
        online = [*self.audio_model.layers.parameters(), *self.audio_model.layernorm.parameters()]
        target = [*self.target_layers.parameters(), *self.target_layernorm.parameters()]
        return list(zip(target, online))

    def ema_decay(self, step: int, total_steps: int) -> float:
        """τ of optimiser step `step` (0-based): linear from `ema_decay_start` to `ema_decay_end` over the run."""
        progress = step / max(total_steps - 1, 1)
        return self.config.ema_decay_start + (self.config.ema_decay_end - self.config.ema_decay_start) * progress

    @torch.no_grad()
    def update_target(self, decay: float) -> None:
        """target ← τ·target + (1 − τ)·online, with the online weights as they are after the optimiser step."""
        target, online = map(list, zip(*self.target_parameter_pairs()))
        # τ·target and (1 − τ)·online rounded separately, then added: the original's arithmetic, so that the
        # near-1 LayerNorm gains of the target move by exactly its tiny steps.
        if target[0].device.type != "cpu":
            torch._foreach_mul_(target, decay)
            torch._foreach_add_(target, torch._foreach_mul(online, 1.0 - decay))
            return
        # On the CPU, `_foreach_*` is a loop over the tensors anyway, and `_foreach_mul` allocates a copy of the
        # whole encoder (page faults): the same products through one reused buffer are bit for bit equal and 1.8x
        # faster for ViT-B.
        size, scratch = max(p.numel() for p in online), {}
        for target_parameter, online_parameter in zip(target, online):
            dtype = online_parameter.dtype
            if dtype not in scratch:
                scratch[dtype] = torch.empty(size, dtype=dtype)
            scaled = scratch[dtype][: online_parameter.numel()].view_as(online_parameter)
            torch.mul(online_parameter, 1.0 - decay, out=scaled)
            target_parameter.mul_(decay).add_(scaled)

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        if hasattr(self, "logit_scale"):
            self.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    @capture_outputs
    def forward(
        self,
        input_features: torch.Tensor,
        caption_embeddings: torch.Tensor | None = None,
        has_caption: torch.Tensor | None = None,
        visible_indices: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> M2D2PreTrainingOutput:
        r"""
        input_features (`torch.FloatTensor` of shape `(batch_size, num_mel_bins, frames)`):
            Normalised log-mel crops of one fixed length (608 frames in the 2025 recipe).
        caption_embeddings (`torch.FloatTensor` of shape `(batch_size, caption_embedding_size)`, *optional*):
            Cached caption embeddings; needed for the CLAP loss.
        has_caption (`torch.BoolTensor` of shape `(batch_size,)`, *optional*): False for clips without a caption
            (their row of `caption_embeddings` is ignored); they contribute to the M2D loss only.
        visible_indices (`torch.LongTensor` of shape `(batch_size, num_visible)`, *optional*): an explicit mask
            (patch p = f * columns + t) to reproduce a step; random unstructured masking otherwise.
        generator (`torch.Generator`, *optional*): source of the random mask, for reproducible runs.
        output_hidden_states (`bool`, *optional*): also return the online encoder's hidden states.
        """
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        hidden_states = [] if output_hidden_states else None
        patches = self.audio_model.embeddings(input_features)
        batch, num_patches, dim = patches.shape
        if visible_indices is None:
            visible_indices, masked_indices = random_unstructured_mask(
                batch, num_patches, self.config.mask_ratio, patches.device, generator
            )
        else:
            check_visible_indices(visible_indices, batch, num_patches)
            masked_indices = complement_indices(visible_indices, num_patches)
        cls = self.audio_model.embeddings.cls_embedding().to(patches.dtype).expand(batch, -1, -1)
        latent = self.audio_model.encode_visible(patches, visible_indices, hidden_states_out=hidden_states)

        with torch.no_grad():
            hidden = torch.cat([cls, patches.gather(1, masked_indices[..., None].expand(-1, -1, dim))], dim=1).detach()
            for layer in self.target_layers:
                hidden = layer(hidden)
            targets = self.target_layernorm(hidden)[:, 1:]

        predictions = self.predictor(latent, visible_indices, masked_indices)
        loss_m2d, standardised = m2d_loss(predictions.float(), targets.float())
        loss = self.config.m2d_loss_weight * loss_m2d

        loss_clap = audio_embeds = text_embeds = None
        if self.config.caption_embedding_size and caption_embeddings is not None:
            audio_embeds = self.audio_projection(latent[:, 1:])
            text_embeds = self.text_projection(caption_embeddings.to(audio_embeds.dtype))
            valid = (
                has_caption if has_caption is not None else torch.ones(batch, dtype=torch.bool, device=latent.device)
            )
            loss_clap = global_clap_loss(audio_embeds.float(), text_embeds.float(), self.logit_scale, valid.bool())
            loss = loss + self.config.clap_loss_weight * loss_clap

        return M2D2PreTrainingOutput(
            loss=loss,
            m2d_loss=loss_m2d,
            clap_loss=loss_clap,
            predictions=predictions,
            targets=standardised,
            audio_embeds=audio_embeds,
            text_embeds=text_embeds,
            visible_indices=visible_indices,
            masked_indices=masked_indices,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )


__all__ = [
    "M2D2ForPreTraining",
    "M2D2PreTrainingOutput",
    "global_clap_loss",
    "m2d_loss",
]
