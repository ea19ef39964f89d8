#!/usr/bin/env python
"""Stage-1 M2D2 pre-training: M2D + CLAP against cached caption embeddings, with accelerate.

    accelerate launch --multi_gpu --num_processes 4 --mixed_precision bf16 examples/pretrain_stage1.py \\
        --train_data /data/audioset --caption_embeddings caption_embeddings --output_dir runs/stage1 \\
        --global_batch_size 2048 --per_device_train_batch_size 512 --max_train_steps 300000

All options: `python examples/pretrain_stage1.py --help`; `--config FILE` reads them from a JSON or YAML file
(command-line options override it). The program reads top to bottom: parse the settings, build the model and the
streams, compute the log-mel statistics, prepare with accelerate, run the shared loop (which checkpoints and
exports `M2D2AudioModel` folders). Its pieces live in `m2d2_hf.training` (`stage1`, `loop`, `optim`).
"""

import logging
from pathlib import Path

from accelerate import Accelerator

from m2d2_hf.feature_extraction_m2d2 import M2D2FeatureExtractor
from m2d2_hf.model_card import write_model_card
from m2d2_hf.modeling_m2d2_pretraining import M2D2ForPreTraining
from m2d2_hf.training import loop
from m2d2_hf.training.arguments import TrainingSettings, parse_settings, settings_record
from m2d2_hf.training.captions import CaptionEmbeddingTable
from m2d2_hf.training.checkpoint import resolve_checkpoint
from m2d2_hf.training.optim import adamw, scaled_learning_rate, warmup_cosine_schedule, weight_decay_groups
from m2d2_hf.training.stage1 import (
    DESCRIPTION,
    Stage1Batches,
    Stage1Settings,
    build_model,
    compute_norm_stats,
    training_attention,
)


logger = logging.getLogger("pretrain_stage1")


class Stage1:
    """What stage 1 adds to the shared loop (a `loop.Stage`): inputs from `Stage1Batches`, the EMA update of the
    target encoder and the temperature clamp after each step, `M2D2AudioModel` exports of the online encoder."""

    loss_names = ("loss", "m2d_loss", "clap_loss")
    description = "stage 1"

    def __init__(
        self,
        accelerator: Accelerator,
        model: M2D2ForPreTraining,
        batches: Stage1Batches,
        settings: Stage1Settings,
        max_train_steps: int,
        card: loop.ExportCard,
    ):
        self.accelerator, self.model, self.batches, self.card = accelerator, model, batches, card
        self.max_train_steps = max_train_steps  # the EMA schedule's length
        self.allow_uncaptioned = settings.allow_uncaptioned

    def make_inputs(self, batch: dict, step: int, micro: int) -> dict:
        return self.batches.inputs(batch, self.accelerator.device, step, self.accelerator.process_index, micro)

    def after_step(self, step: int) -> dict:
        decay = self.model.ema_decay(step, self.max_train_steps)
        self.model.update_target(decay)
        self.model.clamp_logit_scale()
        values = {"ema_decay": decay}
        if hasattr(self.model, "logit_scale"):
            values["logit_scale"] = self.model.logit_scale.item()
        return values

    def export(self, folder: Path, step: int) -> None:
        """Saves the online encoder as an `M2D2AudioModel` folder with its feature extractor and model card."""
        if self.accelerator.is_main_process:
            self.model.audio_model.save_pretrained(folder)
            self.batches.feature_extractor.save_pretrained(folder)
            write_model_card(folder, "M2D2AudioModel", self.card.info(step))
            logger.info(f"exported the encoder to {folder}")


def main(argv: list[str] | None = None) -> Path:
    """Runs stage 1 and returns the folder of the final encoder export (`<output_dir>/final`)."""
    # Parse.
    training, stage = parse_settings((TrainingSettings, Stage1Settings), argv, DESCRIPTION)
    accelerator = loop.build_accelerator(training)  # seeds every RNG, creates --output_dir

    # Build: the caption table fixes the size of the CLAP head; a resumed run gets its weights back below.
    captions = CaptionEmbeddingTable.from_path(stage.caption_embeddings) if stage.caption_embeddings else None
    if captions is None:
        logger.warning(
            "no --caption_embeddings: this run trains the M2D objective alone, without stage 1's CLAP term; cache "
            "the captions' embeddings with examples/cache_caption_embeddings.py and pass --caption_embeddings"
        )
    model = build_model(stage, captions.embedding_size if captions else None)
    model.set_attn_implementation(training_attention(accelerator.device, accelerator.mixed_precision))
    logger.info(f"attention kernel: {model.config._attn_implementation} ({accelerator.mixed_precision} precision)")
    # The feature extractor owns the front end: a continued folder's own, or the default one for a new model.
    if stage.model_name_or_path:
        feature_extractor = M2D2FeatureExtractor.from_model_folder(stage.model_name_or_path, model.config)
    else:
        feature_extractor = M2D2FeatureExtractor.from_audio_config(model.config)
    sampling_rate = feature_extractor.sampling_rate

    def batch_stream(seed_offset: int) -> loop.BatchStream:
        """The training stream (offset 0) or the statistics pass's own shuffle of it (offset 1)."""
        loader = loop.streamed_loader(
            training,
            accelerator,
            feature_extractor,
            min_samples=int(stage.min_seconds * sampling_rate),
            seed=training.seed + seed_offset,
        )
        return loop.BatchStream(loader, accelerator.process_index)

    checkpoint, _ = resolve_checkpoint(training.resume_from_checkpoint, training.output_dir)
    batches = Stage1Batches(feature_extractor, stage.crop_frames, captions, training.seed)

    # The log-mel statistics: given, computed over random crops, or (resuming) restored with the checkpoint.
    if stage.norm_stats:
        feature_extractor.norm_stats = list(stage.norm_stats)
    elif not checkpoint:
        norm_stats = compute_norm_stats(
            iter(batch_stream(1)), batches, stage.norm_stats_crops, accelerator, training.seed
        )
        feature_extractor.norm_stats = list(norm_stats)
        logger.info(f"norm_stats from {stage.norm_stats_crops} crops: {feature_extractor.norm_stats}")

    # Prepare: AdamW over the decay groups, warm-up + cosine per step, accelerate, then resume.
    optimizer = adamw(
        weight_decay_groups(model, training.weight_decay),
        lr=scaled_learning_rate(stage.base_learning_rate, training.global_batch_size),
        betas=(training.adam_beta1, training.adam_beta2),
    )
    scheduler = warmup_cosine_schedule(optimizer, training.warmup_steps, training.max_train_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = loop.RunState(feature_extractor.norm_stats)
    run = loop.TrainingRun(model, optimizer, scheduler, batch_stream(0), state)  # start_run sets the step of a resume
    record = settings_record(training, stage)
    loop.start_run(accelerator, run, checkpoint, "m2d2_stage1", record)
    unwrapped = accelerator.unwrap_model(model)
    feature_extractor.norm_stats = list(run.state.norm_stats)

    # Loop and export: the loop checkpoints every --checkpointing_steps and exports the encoder at the end.
    card = loop.ExportCard("examples/pretrain_stage1.py", record, [stage.model_name_or_path])
    model.train()
    return loop.run_training(
        accelerator,
        training,
        run,
        Stage1(accelerator, unwrapped, batches, stage, training.max_train_steps, card),
    )


if __name__ == "__main__":
    main()
