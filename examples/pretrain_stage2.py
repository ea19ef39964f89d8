#!/usr/bin/env python
"""Stage-2 / 2.1 M2D2 CLAP training with the audio encoder frozen, with accelerate.

    accelerate launch examples/pretrain_stage2.py --train_data DATA --audio_model STAGE1_1_ENCODER \\
        --text_model google-bert/bert-base-uncased --output_dir runs/stage2 --max_train_steps 30000
    # stage 2.1: continue from the stage-2 result without the audio mask
    accelerate launch examples/pretrain_stage2.py --model_name_or_path runs/stage2/final --mask_ratio 0 ...

All options: `python examples/pretrain_stage2.py --help`; `--config FILE` reads them from a JSON or YAML file
(command-line options override it). The program reads top to bottom: parse the settings, build the CLAP model
(frozen encoder, text tower, new projector) and the caption stream, prepare the objective with accelerate, run the
shared loop (which checkpoints and exports complete `M2D2ClapModel` folders with their processor). Its pieces
live in `m2d2_hf.training` (`stage2`, `loop`, `optim`, `captions`).
"""

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from m2d2_hf.feature_extraction_m2d2 import M2D2FeatureExtractor
from m2d2_hf.model_card import write_model_card
from m2d2_hf.modeling_m2d2 import M2D2ClapModel
from m2d2_hf.modeling_m2d2_pretraining import MAX_LOGIT_SCALE
from m2d2_hf.processing_m2d2 import M2D2Processor
from m2d2_hf.training import loop
from m2d2_hf.training.arguments import parse_settings, settings_record
from m2d2_hf.training.captions import read_captions
from m2d2_hf.training.checkpoint import resolve_checkpoint
from m2d2_hf.training.optim import adamw, scaled_learning_rate, warmup_cosine_schedule, weight_decay_groups
from m2d2_hf.training.stage2 import (
    DESCRIPTION,
    FrozenEncoderClapObjective,
    Stage2Batches,
    Stage2Settings,
    Stage2TrainingSettings,
    build_model,
)


logger = logging.getLogger("pretrain_stage2")


class Stage2:
    """What stage 2 adds to the shared loop (a `loop.Stage`): inputs from `Stage2Batches`, the temperature clamp
    after each step, complete `M2D2ClapModel` exports with their processor."""

    loss_names = ("loss",)
    description = "stage 2"
    allow_uncaptioned = None

    def __init__(
        self, accelerator: Accelerator, clap: M2D2ClapModel, tokenizer, batches: Stage2Batches, card: loop.ExportCard
    ):
        self.accelerator, self.clap, self.tokenizer = accelerator, clap, tokenizer
        self.batches, self.card = batches, card

    def make_inputs(self, batch: dict, step: int, micro: int) -> dict:
        return self.batches.inputs(batch, self.accelerator.device, step, self.accelerator.process_index, micro)

    def after_step(self, step: int) -> dict:
        with torch.no_grad():
            self.clap.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        return {"logit_scale": self.clap.logit_scale.item()}

    def export(self, folder: Path, step: int) -> None:
        """Saves the complete CLAP model with its processor (feature extractor + tokenizer) and model card."""
        if self.accelerator.is_main_process:
            self.clap.save_pretrained(folder)
            M2D2Processor(self.batches.feature_extractor, self.tokenizer).save_pretrained(folder)
            write_model_card(folder, "M2D2ClapModel", self.card.info(step))
            logger.info(f"exported the CLAP model to {folder}")


def main(argv: list[str] | None = None) -> Path:
    """Runs stage 2 (or 2.1) and returns the folder of the final export (`<output_dir>/final`)."""
    # Parse.
    training, stage = parse_settings((Stage2TrainingSettings, Stage2Settings), argv, DESCRIPTION)
    accelerator = loop.build_accelerator(training)  # seeds every RNG, creates --output_dir

    # Build: the CLAP model and its tokenizer; captions from a separate file, or a column of the stream.
    clap, tokenizer = build_model(stage)
    audio_config = clap.config.audio_config
    captions = None
    if stage.captions:
        captions = read_captions(
            stage.captions, caption_column=stage.caption_column, separator=stage.caption_separator
        )
    keep = [] if captions is not None else [stage.caption_column]
    # The feature extractor owns the front end: the folder's own (the CLAP folder, or the encoder's).
    feature_extractor = M2D2FeatureExtractor.from_model_folder(
        stage.model_name_or_path or stage.audio_model, audio_config
    )
    loader = loop.streamed_loader(training, accelerator, feature_extractor, keep_columns=keep)
    batches = Stage2Batches(stage, training.seed, feature_extractor, tokenizer, audio_config, captions)

    # Prepare: AdamW over the trainable parameters (projector, text tower, temperature), warm-up + cosine per step,
    # the objective (frozen encoder → projector, text tower → global contrastive loss) under accelerate, resume.
    optimizer = adamw(
        weight_decay_groups(clap, training.weight_decay),
        lr=scaled_learning_rate(stage.base_learning_rate, training.global_batch_size),
        betas=(training.adam_beta1, training.adam_beta2),
    )
    scheduler = warmup_cosine_schedule(optimizer, training.warmup_steps, training.max_train_steps)
    objective, optimizer = accelerator.prepare(FrozenEncoderClapObjective(clap), optimizer)
    stream = loop.BatchStream(loader, accelerator.process_index)
    run = loop.TrainingRun(objective, optimizer, scheduler, stream, loop.RunState(list(feature_extractor.norm_stats)))
    checkpoint, _ = resolve_checkpoint(training.resume_from_checkpoint, training.output_dir)
    record = settings_record(training, stage)
    loop.start_run(accelerator, run, checkpoint, "m2d2_stage2", record)

    # Loop and export. The encoder is frozen (and dropout-free anyway); the text tower trains with its dropout, as
    # in the paper, unless it is frozen too.
    objective.train()
    clap.audio_model.eval()
    if stage.freeze_text_model:
        clap.text_model.eval()
    sources = [stage.model_name_or_path, stage.audio_model, stage.text_model]
    card = loop.ExportCard("examples/pretrain_stage2.py", record, sources)
    return loop.run_training(accelerator, training, run, Stage2(accelerator, clap, tokenizer, batches, card))


if __name__ == "__main__":
    main()
