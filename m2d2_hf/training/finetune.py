"""Stage 1.1 of the M2D2 recipe: audio-classification fine-tuning of an M2D2 encoder, with accelerate.

The pieces of `examples/finetune_audio_classification.py` (the program): its settings, labels, model, batches,
streams and evaluation. The defaults are the stage-1.1 recipe (docs/method.md §6.3: EVAR `finetune.py` with m2d
`util/ft-as2m.sh` settings): random 1001-frame crops, mixup α 0.5 on the raw log-mel and the labels,
normalisation with the encoder folder's `norm_stats` (its feature extractor's), one frequency mask (30 bins) and
one time mask (192 frames) shared by the batch, structured patch masking at 0.5, the EVAR head (BatchNorm1d
without affine → Linear), SGD with
momentum 0.9 and no weight decay (the original's LARS, whose trust ratio is skipped at weight decay 0) at lr 2.0 for
batch 64, 15 of 70 epochs warm-up then cosine (timm's `CosineLRScheduler`), no gradient clipping, BCE (multi-label)
or cross-entropy (single-label).

Data path: streamed audio with a label column (`load_audio_stream`, decoded in DataLoader workers, broken items
skipped and counted) → log-mel of whole clips on the training device → a random crop per clip (zero-padded at the
end in raw log-mel space) → mixup → normalisation → frequency/time masks → `M2D2ForAudioClassification` (visible
patches only when the patch mask is on) → loss against the (mixed) targets.

Labels:
* the label set is `--labels` (comma list) or, without it, every label found by one pass over the filtered training
  rows at the start (rows only: no audio is decoded), sorted; `id2label` follows that order;
* single-label: the cell is one label (a string, or an integer used as its string form); multi-label
  (`--multi_label`): a list cell (Parquet / JSONL / hub datasets) or a string split on `--label_separator`
  (e.g. "Speech;Music" in a CSV; giving a separator implies `--multi_label`);
* rows with no label of the set (an unknown label, an empty cell) are left out of the stream before decoding, as
  `--filter` does; each DataLoader worker counts them and logs the first one and then a summary every 1000
  (`LabelledRows`). In a multi-label row, names outside the set are ignored and the known ones kept.

Evaluation (every `--eval_steps` and at the end, when `--eval_split`, `--eval_filter` or `--eval_data` is given): the
first `--crop_frames` frames of each clip (zero-padded in raw log-mel space), all tokens, the head's running
BatchNorm statistics; each process scores its shard of the evaluation stream and the main process computes top-1
accuracy (single-label) or macro mAP (multi-label) over the gathered predictions, logged as `eval_accuracy` /
`eval_map` with `eval_loss` and `eval_clips`.

Model and loss: the encoder of `--model_name_or_path` under a new head (`num_labels`, `id2label`, `problem_type`).
When `--crop_frames` exceeds the encoder's `chunk_frames` (608 → 1001 in stage 1.1), `chunk_frames` becomes the
crop length and the positional table is recomputed for the longer grid with `sincos_position_table` (it is fixed
sin-cos; `--position_table bicubic` resizes the stored one as the original's EVAR loader did instead); the log says
which. The loss is computed by `ClassificationObjective` against float targets [B, C], so that mixed (soft) targets
work for both problems: cross-entropy with probability targets (single-label) or BCE-with-logits (multi-label); the
model's own `labels` loss (which takes 2-D labels as multi-label) is not used. Training batches drop the last
partial batch of each pass, so the BatchNorm head always normalises full batches.

The head's BatchNorm1d stays a plain (per-process) BatchNorm, as the original trained in one process (DataParallel);
before each evaluation the main process's running statistics are copied to the others.
"""

import copy
import logging
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn
from torch.utils.data import DataLoader
from transformers import AutoConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from ..configuration_m2d2 import M2D2AudioConfig, M2D2Config
from ..data.labels import LabelReader, parse_label_list, targets_of
from ..evaluation.metrics import mean_average_precision, top_k_accuracy
from ..feature_extraction_m2d2 import M2D2FeatureExtractor
from ..masking import random_structured_mask
from ..modeling_m2d2 import M2D2AudioModel, M2D2ClapModel, M2D2ForAudioClassification
from .arguments import TrainingSettings, option, repeatable
from .data import load_audio_stream, random_log_mel_crops
from .loop import parse_filters, step_generator, streamed_loader


logger = logging.getLogger(__name__)

SINGLE_LABEL, MULTI_LABEL = "single_label_classification", "multi_label_classification"
# timm CosineLRScheduler(lr_min=1e-7) of the original.
MIN_LEARNING_RATE = 1e-7
DEFAULT_LEARNING_RATES = {"sgd": 2.0, "adamw": 1e-4}
DEFAULT_WEIGHT_DECAYS = {"sgd": 0.0, "adamw": 0.05}
DESCRIPTION = (
    "Stage-1.1 M2D2 fine-tuning: audio classification from an M2D2 encoder folder. Defaults follow the 2025 recipe "
    "(AudioSet-2M in EVAR): 1001-frame random crops, mixup 0.5, frequency mask 30, time mask 192, structured patch "
    "mask 0.5, SGD momentum 0.9 without weight decay (the original's LARS) at lr 2.0 for batch 64, 15 of 70 epochs "
    "warm-up then cosine, no gradient clipping. --weight_decay defaults to 0 with sgd and 0.05 with adamw; "
    "--learning_rate to 2.0 with sgd and 1e-4 with adamw. Scale the lr with the batch."
)


@dataclass
class FinetuneSettings:
    """The model, label, augmentation and optimiser options of fine-tuning (the shared ones:
    `FinetuneTrainingSettings`)."""

    model_name_or_path: str = option(
        help="M2D2AudioModel folder (e.g. the stage-1 export <out>/final, a converted encoder), or an M2D2 CLAP / "
        "pre-training / classification folder whose audio encoder is taken",
    )
    crop_frames: int = option(1001, help="log-mel frames per crop (10.01 s)")
    position_table: Literal["recompute", "bicubic"] = option(
        "recompute",
        help="when --crop_frames exceeds the encoder's chunk_frames: recompute the fixed sin-cos table for the "
        "longer grid, or resize the stored one bicubically as the original's EVAR loader did",
    )
    min_seconds: float = option(0.0, help="zero-pad waveforms to this length first")

    label_column: str = option("label", help="column holding the label(s)")
    labels: str | None = option(
        None,
        help="comma-separated label set (its order is id2label's); default: every label of the filtered training "
        "rows, sorted, from one pass over the rows at the start (no audio decoding, but remote data is read once: "
        "give the labels there). Rows with no label of the set are left out. Integer labels (a ClassLabel column) "
        "are used as their string form: prefer a column of names",
    )
    multi_label: bool = option(False, help="multi-label targets, sigmoid + BCE, mAP")
    label_separator: str | None = option(
        None, help="split string label cells on this (e.g. ';'); implies --multi_label"
    )

    mixup: float = option(0.5, help="mixup alpha, lambda ~ Beta(a, a) per clip (0: off)")
    freq_mask: int = option(30, help="torchaudio FrequencyMasking bins (0: off)")
    time_mask: int = option(192, help="torchaudio TimeMasking frames (0: off)")
    training_mask: float = option(0.5, help="structured frequency/time patch mask ratio (0: off)")
    drop_stripes: bool = option(
        False,
        help="drop the stripe patches (the method as described) instead of the original code's order, which keeps "
        "them and drops the last non-stripe patches (spec 11.1)",
    )

    optimizer: Literal["sgd", "adamw"] = option("sgd", help="sgd: momentum 0.9 (LARS as used)")
    learning_rate: float | None = option(None, help="peak lr (sgd: 2.0 at batch 64)")
    momentum: float = option(0.9, help="SGD momentum")
    layer_decay: float = option(
        1.0,
        help="layer-wise lr decay (1.0: off): lr × decay^(L+1-level), level 0 = patch embedding + CLS, level i = "
        "encoder layer i, level L+1 = final LayerNorm + head",
    )

    def __post_init__(self):
        if self.label_separator is not None and not self.multi_label:
            self.multi_label = True  # the program logs it once logging is set up
            self.multi_label_implied = True
        else:
            self.multi_label_implied = False


@dataclass
class EvaluationSettings:
    """When and on what fine-tuning evaluates (off unless one of eval_data, eval_split, eval_filter is given)."""

    eval_data: str | None = option(None, help="evaluation source (default: --train_data)")
    eval_split: str | None = option(None, help="evaluation split (default: --split)")
    eval_filter: list[str] = repeatable("evaluation rows, e.g. split=test (repeatable)", "COLUMN=VALUE")
    eval_steps: int = option(3125, help="evaluate every N steps and at the end (original: one epoch)")
    per_device_eval_batch_size: int | None = option(None, help="default: training batch")

    @property
    def enabled(self) -> bool:
        return bool(self.eval_split or self.eval_filter or self.eval_data)

    def due(self, done: int, total_steps: int) -> bool:
        return self.enabled and (done == total_steps or bool(self.eval_steps and done % self.eval_steps == 0))


@dataclass
class FinetuneTrainingSettings(TrainingSettings):
    """The shared options with stage 1.1's defaults: batch 64, 15 of 70 epochs warm-up, no clipping."""

    global_batch_size: int = option(64, help="clips per optimiser step (stage 1.1: 64)")
    per_device_train_batch_size: int = option(
        64, help="clips per forward pass on each process; gradient accumulation makes up the global batch"
    )
    warmup_ratio: float = option(15 / 70, help="fraction of the steps for linear warm-up (stage 1.1: 15 of 70 epochs)")
    weight_decay: float | None = option(
        None, help="weight decay (default: 0 with sgd, 0.05 with adamw; no decay on biases and 1-D tensors)"
    )
    max_grad_norm: float = option(0.0, help="gradient clipping (0: off, the original)")


# ----------------------------------------------------------------------------------------------------------------
# Labels
# ----------------------------------------------------------------------------------------------------------------


class LabelledRows:
    """Row predicate of the streams: `--filter` (or `--eval_filter`) and at least one label of the label set.

    The rows it rejects for their labels are counted by each DataLoader worker (each pass over the data starts its
    workers afresh): the first one is logged with its labels, then a summary every `warn_every`."""

    def __init__(self, reader: LabelReader, label_set, base_filter=None, warn_every: int = 1000):
        self.reader, self.label_set, self.base_filter = reader, frozenset(label_set), base_filter
        self.warn_every = warn_every
        self.left_out = 0

    def __call__(self, row: dict) -> bool:
        if self.base_filter is not None and not self.base_filter(row):
            return False
        names = self.reader.names(row.get(self.reader.column))
        if any(name in self.label_set for name in names):
            return True
        self.left_out += 1
        if self.left_out == 1:
            logger.warning(
                f"leaving out rows with no label of the label set (first: {names or 'no label'}); a summary follows "
                f"every {self.warn_every} such rows of this worker"
            )
        elif self.left_out % self.warn_every == 0:
            logger.warning(f"{self.left_out} rows with no label of the label set left out by this worker so far")
        return False


class LabelCollector:
    """Row predicate of the label pass: records every label of the rows `base_filter` keeps and rejects all rows,
    so that iterating the stream reads the rows without decoding any audio."""

    def __init__(self, reader: LabelReader, base_filter=None):
        self.reader, self.base_filter = reader, base_filter
        self.counts: dict[str, int] = {}
        self.rows = self.unlabelled = 0

    def __call__(self, row: dict) -> bool:
        if self.base_filter is None or self.base_filter(row):
            names = self.reader.names(row.get(self.reader.column))
            self.rows += 1
            self.unlabelled += not names
            for name in names:
                self.counts[name] = self.counts.get(name, 0) + 1
        return False


def collect_labels(training: TrainingSettings, reader: LabelReader) -> list[str]:
    """The sorted labels of the filtered training rows (one pass over the rows, in this process)."""
    collector = LabelCollector(reader, parse_filters(training.filter))
    stream = load_audio_stream(
        training.train_data,
        split=training.split,
        audio_column=training.audio_column,
        id_column=training.id_column,
        keep_columns=[reader.column],
        shuffle_buffer=0,
        filter_fn=collector,
    )
    for _ in stream:  # the collector rejects every row: nothing is decoded
        pass
    if not collector.counts:
        raise ValueError(
            f"no labels in column {reader.column!r} of {collector.rows} training rows: check --label_column, "
            f"--split and --filter"
        )
    logger.info(
        f"label pass: {len(collector.counts)} labels in {collector.rows} rows"
        + (f" ({collector.unlabelled} rows without a label are left out)" if collector.unlabelled else "")
    )
    return sorted(collector.counts)


def resolve_labels(
    names: str | None, training: TrainingSettings, reader: LabelReader, accelerator: Accelerator
) -> list[str]:
    """The label set: `names` (a comma list), or every label of the training rows found by the main process."""
    if names:
        return parse_label_list(names)
    found = [collect_labels(training, reader) if accelerator.is_main_process else None]
    broadcast_object_list(found, from_process=0)
    return found[0]


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


def load_encoder(path: str) -> M2D2AudioModel:
    """The audio encoder of an M2D2 folder: an M2D2AudioModel, a classification or pre-training folder (their
    `audio_model`), or a CLAP folder (its audio tower)."""
    config = AutoConfig.from_pretrained(path)
    if isinstance(config, M2D2Config):
        return M2D2ClapModel.from_pretrained(path).audio_model
    if not isinstance(config, M2D2AudioConfig):
        raise ValueError(f"{path} is not an M2D2 folder (config type {type(config).__name__})")
    return M2D2AudioModel.from_pretrained(path)


def build_model(settings: FinetuneSettings, labels: list[str]) -> M2D2ForAudioClassification:
    """`M2D2ForAudioClassification` with the encoder of `--model_name_or_path`, a new head for `labels` and, when
    `--crop_frames` exceeds the encoder's chunk, the grid extended to it (`resize_position_embeddings`)."""
    encoder = load_encoder(settings.model_name_or_path)
    if settings.crop_frames > encoder.config.chunk_frames:
        chunk_frames, rows, old_columns = (
            encoder.config.chunk_frames,
            encoder.config.frequency_patches,
            encoder.config.time_patches,
        )
        recompute = settings.position_table == "recompute"
        encoder.resize_position_embeddings(settings.crop_frames, "sincos" if recompute else "bicubic")
        how = (
            "recomputed as the fixed 2-D sin-cos table (not interpolated)"
            if recompute
            else "resized bicubically from the stored table (the original EVAR loader's way)"
        )
        logger.info(
            f"--crop_frames {settings.crop_frames} exceeds the encoder's chunk of {chunk_frames} frames: "
            f"chunk_frames set to {settings.crop_frames}, positional table {rows}x{old_columns} → "
            f"{rows}x{encoder.config.time_patches} {how}"
        )
    config = copy.deepcopy(encoder.config)
    config.architectures = None
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: index for index, name in enumerate(labels)}
    config.problem_type = MULTI_LABEL if settings.multi_label else SINGLE_LABEL
    model = M2D2ForAudioClassification(config)
    model.audio_model.load_state_dict(encoder.state_dict(), strict=True)
    return model


class ClassificationObjective(nn.Module):
    """The training model: `M2D2ForAudioClassification` and the loss against float targets [B, C] (mixup makes them
    soft): cross-entropy with probability targets (single-label; equal to the index form for one-hot targets) or
    BCE-with-logits (multi-label), as the original. A one-clip batch uses the head's running statistics (BatchNorm
    cannot normalise one value)."""

    def __init__(self, model: M2D2ForAudioClassification):
        super().__init__()
        self.model = model
        self.multi_label = model.config.problem_type == MULTI_LABEL

    def forward(self, input_features, targets, visible_indices=None) -> SequenceClassifierOutput:
        single = self.training and input_features.shape[0] == 1
        if single:
            self.model.head_norm.eval()
        logits = self.model(input_features=input_features, visible_indices=visible_indices).logits
        if single:
            self.model.head_norm.train()
        targets = targets.to(logits.dtype)
        if self.multi_label:
            loss = F.binary_cross_entropy_with_logits(logits, targets)
        else:
            loss = F.cross_entropy(logits, targets)
        return SequenceClassifierOutput(loss=loss, logits=logits)


# ----------------------------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------------------------


def layer_level(name: str, num_layers: int) -> int:
    """Layer-decay level of a parameter of M2D2ForAudioClassification: 0 patch embedding and CLS, i + 1 encoder
    layer i, num_layers + 1 everything after the layers (final LayerNorm, head)."""
    if name.startswith("audio_model.embeddings."):
        return 0
    if name.startswith("audio_model.layers."):
        return int(name.split(".")[2]) + 1
    return num_layers + 1


def parameter_groups(
    model: M2D2ForAudioClassification, learning_rate: float, weight_decay: float, layer_decay: float
) -> list[dict]:
    """Groups by (layer level, decay): lr × layer_decay^(L + 1 - level); `weight_decay` except on biases and tensors
    of at most one dimension (timm's rule). The head's group comes first, so the logged lr is the peak one."""
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, float], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        level = layer_level(name, num_layers)
        decay = 0.0 if parameter.ndim <= 1 or name.endswith(".bias") else weight_decay
        group = groups.setdefault(
            (level, decay),
            {"params": [], "lr": learning_rate * layer_decay ** (num_layers + 1 - level), "weight_decay": decay},
        )
        group["params"].append(parameter)
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], key[1]))]


def build_optimizer(
    settings: FinetuneSettings, training: TrainingSettings, model: M2D2ForAudioClassification
) -> torch.optim.Optimizer:
    """SGD with momentum (the original's LARS at weight decay 0) or AdamW over the layer-decay groups; the lr and
    weight decay default by optimiser."""
    learning_rate = settings.learning_rate
    if learning_rate is None:
        learning_rate = DEFAULT_LEARNING_RATES[settings.optimizer]
    weight_decay = training.weight_decay
    if weight_decay is None:
        weight_decay = DEFAULT_WEIGHT_DECAYS[settings.optimizer]
    groups = parameter_groups(model, learning_rate, weight_decay, settings.layer_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=learning_rate, momentum=settings.momentum)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(training.adam_beta1, training.adam_beta2))


# ----------------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------------


def head_log_mel_crops(log_mel: torch.Tensor, num_frames: torch.Tensor, crop_frames: int) -> torch.Tensor:
    """The first `crop_frames` frames of each clip, zeros past its own frames (raw log-mel space), [B, F, crop]."""
    if log_mel.shape[-1] < crop_frames:
        log_mel = F.pad(log_mel, (0, crop_frames - log_mel.shape[-1]))
    crops = log_mel[..., :crop_frames]
    valid = torch.arange(crop_frames, device=log_mel.device)[None, :] < num_frames.to(log_mel.device)[:, None]
    return crops.masked_fill(~valid[:, None, :], 0.0)


def mixup(
    log_mel: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """λ ~ Beta(α, α) per clip, paired with a random permutation of the batch: x λ + x[perm] (1 - λ), the same for
    the targets. The draws come from `generator` (through a numpy generator seeded from it)."""
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    batch = log_mel.shape[0]
    lam = torch.from_numpy(rng.beta(alpha, alpha, size=batch).astype(np.float32)).to(log_mel.device)
    perm = torch.from_numpy(rng.permutation(batch)).to(log_mel.device)
    mixed = lam[:, None, None] * log_mel + (1 - lam[:, None, None]) * log_mel[perm]
    return mixed, lam[:, None] * targets + (1 - lam[:, None]) * targets[perm]


def spec_masks(features: torch.Tensor, freq_mask: int, time_mask: int, generator: torch.Generator) -> torch.Tensor:
    """torchaudio `FrequencyMasking(freq_mask)` then `TimeMasking(time_mask)` with `iid_masks=False` (one mask of
    each for the whole batch, value 0), their draws seeded from `generator` (torchaudio uses the global CPU RNG,
    which is forked around the call)."""
    if not freq_mask and not time_mask:
        return features
    import torchaudio

    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        if freq_mask:
            features = torchaudio.transforms.FrequencyMasking(freq_mask)(features)
        if time_mask:
            features = torchaudio.transforms.TimeMasking(time_mask)(features)
    return features


class FinetuneBatches:
    """Turns collated waveform batches into the inputs of `ClassificationObjective` on the training device."""

    def __init__(
        self,
        settings: FinetuneSettings,
        seed: int,
        feature_extractor: M2D2FeatureExtractor,
        config: M2D2AudioConfig,
        reader: LabelReader,
    ):
        self.settings, self.seed, self.feature_extractor, self.reader = settings, seed, feature_extractor, reader
        self.label2id = dict(config.label2id)
        self.grid = (config.frequency_patches, settings.crop_frames // config.patch_size[1])

    def log_mel(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        waves = batch["waveforms"].to(device, non_blocking=True)
        clips = [wave[:length] for wave, length in zip(waves, batch["lengths"].tolist())]
        return self.feature_extractor.batch_log_mel(clips)

    def targets(self, batch: dict, device: torch.device) -> torch.Tensor:
        return targets_of(batch[self.reader.column], self.reader, self.label2id).to(device)

    def train_inputs(self, batch: dict, device: torch.device, step: int, process: int, micro: int) -> dict:
        settings = self.settings

        def generator(purpose: str) -> torch.Generator:
            return step_generator(self.seed, step, process, f"{purpose}{micro}")

        log_mel, num_frames = self.log_mel(batch, device)
        crops = random_log_mel_crops(log_mel, num_frames, settings.crop_frames, generator("crop"))
        targets = self.targets(batch, device)
        if settings.mixup > 0:
            crops, targets = mixup(crops, targets, settings.mixup, generator("mixup"))
        features = self.feature_extractor.normalize(crops)
        features = spec_masks(features, settings.freq_mask, settings.time_mask, generator("specmask"))
        inputs = {"input_features": features, "targets": targets}
        if settings.training_mask > 0:
            inputs["visible_indices"], _ = random_structured_mask(
                features.shape[0],
                *self.grid,
                settings.training_mask,
                device,
                generator("patchmask"),
                original_order=not settings.drop_stripes,
            )
        return inputs

    def eval_inputs(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        log_mel, num_frames = self.log_mel(batch, device)
        features = self.feature_extractor.normalize(head_log_mel_crops(log_mel, num_frames, self.settings.crop_frames))
        return features, self.targets(batch, device)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: M2D2ForAudioClassification, make_loader, prepare: FinetuneBatches, accelerator) -> dict:
    """Scores this process's shard of the evaluation stream; the main process computes the metrics over all
    shards (the others return an empty dict)."""
    if accelerator.num_processes > 1 and torch.distributed.is_initialized():
        for buffer in model.head_norm.buffers():  # the saved model is the main process's
            torch.distributed.broadcast(buffer, src=0)
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for batch in make_loader():
        if batch["waveforms"].shape[0] == 0:
            continue
        features, batch_targets = prepare.eval_inputs(batch, accelerator.device)
        logits.append(model(input_features=features).logits.float().cpu())
        targets.append(batch_targets.cpu())
    model.train(was_training)
    empty = torch.zeros(0, model.config.num_labels)
    local = (torch.cat(logits) if logits else empty, torch.cat(targets) if targets else empty)
    shards = gather_object([local])
    if not accelerator.is_main_process:
        return {}
    scores = torch.cat([shard[0] for shard in shards])
    labels = torch.cat([shard[1] for shard in shards])
    if scores.shape[0] == 0:
        logger.warning("the evaluation stream is empty: check --eval_split / --eval_filter and the label set")
        return {"eval_clips": 0}
    values = {"eval_clips": int(scores.shape[0])}
    if model.config.problem_type == MULTI_LABEL:
        values["eval_loss"] = float(F.binary_cross_entropy_with_logits(scores, labels))
        try:
            values["eval_map"] = mean_average_precision(scores.sigmoid().numpy(), labels.numpy())
        except ValueError as error:  # no class with a positive clip
            logger.warning(f"eval_map: {error}")
            values["eval_map"] = float("nan")
    else:
        index = labels.argmax(1)
        values["eval_loss"] = float(F.cross_entropy(scores, index))
        values["eval_accuracy"] = top_k_accuracy(scores, index, k=1)
    return values


# ----------------------------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------------------------


class LabelledStreams:
    """The training and evaluation loaders of a fine-tuning run: rows with a label of the set (and the filters),
    the label column kept, clips zero-padded to `--min_seconds`, at the rate of the feature extractor (whose
    `max_peak` drops clips too loud for its log-mel)."""

    def __init__(
        self,
        training: TrainingSettings,
        evaluation: EvaluationSettings,
        accelerator: Accelerator,
        feature_extractor: M2D2FeatureExtractor,
        reader: LabelReader,
        labels: list[str],
        min_seconds: float,
    ):
        self.training, self.evaluation, self.accelerator = training, evaluation, accelerator
        self.feature_extractor, self.reader, self.labels = feature_extractor, reader, labels
        self.min_samples = int(min_seconds * feature_extractor.sampling_rate)

    def loader(self, data: str, split: str, filters: list[str], batch_size: int, shuffle_buffer: int, train: bool):
        return streamed_loader(
            self.training,
            self.accelerator,
            self.feature_extractor,
            data=data,
            split=split,
            batch_size=batch_size,
            filter_fn=LabelledRows(self.reader, self.labels, parse_filters(filters)),
            shuffle_buffer=shuffle_buffer,
            keep_columns=[self.reader.column],
            min_samples=self.min_samples,
            drop_last=train,  # equal training batches for the BatchNorm head
        )

    def train_loader(self) -> DataLoader:
        training = self.training
        return self.loader(
            training.train_data,
            training.split,
            training.filter,
            training.per_device_train_batch_size,
            training.shuffle_buffer,
            True,
        )

    def eval_loader(self) -> DataLoader:
        training, evaluation = self.training, self.evaluation
        batch_size = evaluation.per_device_eval_batch_size or training.per_device_train_batch_size
        return self.loader(
            evaluation.eval_data or training.train_data,
            evaluation.eval_split or training.split,
            evaluation.eval_filter,
            batch_size,
            0,
            False,
        )
