#!/usr/bin/env python
"""Stage-1.1 M2D2 fine-tuning: audio classification from an M2D2 encoder folder, with accelerate.

    accelerate launch examples/finetune_audio_classification.py --model_name_or_path ENCODER \\
        --train_data /data/audioset --multi_label --output_dir runs/stage1_1 --max_train_steps 218750

All options: `python examples/finetune_audio_classification.py --help`; `--config FILE` reads them from a JSON or
YAML file (command-line options override it). The program reads top to bottom: parse the settings, find the label
set, build the classifier (the encoder under a new head, its grid grown to the crop), the streams and the batches,
prepare the objective with accelerate, run the shared loop (which evaluates when asked, checkpoints and exports
`M2D2ForAudioClassification` folders that `pipeline("audio-classification")` loads). Its pieces, and the recipe's
details (labels, mixup, masks, the head, the schedule), are in `m2d2_hf.training.finetune`.
"""

import logging
from pathlib import Path

from accelerate import Accelerator

from m2d2_hf.data.labels import LabelReader
from m2d2_hf.feature_extraction_m2d2 import M2D2FeatureExtractor
from m2d2_hf.model_card import write_model_card
from m2d2_hf.modeling_m2d2 import M2D2ForAudioClassification
from m2d2_hf.training import loop
from m2d2_hf.training.arguments import parse_settings, settings_record
from m2d2_hf.training.checkpoint import resolve_checkpoint
from m2d2_hf.training.finetune import (
    DESCRIPTION,
    MIN_LEARNING_RATE,
    ClassificationObjective,
    EvaluationSettings,
    FinetuneBatches,
    FinetuneSettings,
    FinetuneTrainingSettings,
    LabelledStreams,
    build_model,
    build_optimizer,
    evaluate,
    resolve_labels,
)
from m2d2_hf.training.optim import timm_cosine_schedule


logger = logging.getLogger("finetune_audio_classification")


class Finetune:
    """What fine-tuning adds to the shared loop (a `loop.Stage`): inputs from `FinetuneBatches`, an evaluation when
    due after a step, exports of the classifier (a folder `pipeline("audio-classification")` loads)."""

    loss_names = ("loss",)
    description = "fine-tuning"
    allow_uncaptioned = None

    def __init__(
        self,
        accelerator: Accelerator,
        model: M2D2ForAudioClassification,
        batches: FinetuneBatches,
        streams: LabelledStreams,
        max_train_steps: int,
        card: loop.ExportCard,
    ):
        self.accelerator, self.model, self.batches, self.streams = accelerator, model, batches, streams
        self.max_train_steps, self.card = max_train_steps, card

    def make_inputs(self, batch: dict, step: int, micro: int) -> dict:
        return self.batches.train_inputs(batch, self.accelerator.device, step, self.accelerator.process_index, micro)

    def after_step(self, step: int) -> dict:
        done = step + 1
        if self.streams.evaluation.due(done, self.max_train_steps):
            values = evaluate(self.model, self.streams.eval_loader, self.batches, self.accelerator)
            if self.accelerator.is_main_process:
                logger.info(f"evaluation at step {done}: {values}")
            self.accelerator.log(values, step=done)
        return {}

    def export(self, folder: Path, step: int) -> None:
        """Saves the classification model with its feature extractor and model card."""
        if self.accelerator.is_main_process:
            self.model.save_pretrained(folder)
            self.batches.feature_extractor.save_pretrained(folder)
            write_model_card(folder, "M2D2ForAudioClassification", self.card.info(step))
            logger.info(f"exported the classifier to {folder}")


def main(argv: list[str] | None = None) -> Path:
    """Fine-tunes and returns the folder of the final export (`<output_dir>/final`)."""
    # Parse.
    training, settings, evaluation = parse_settings(
        (FinetuneTrainingSettings, FinetuneSettings, EvaluationSettings), argv, DESCRIPTION
    )
    accelerator = loop.build_accelerator(training)  # seeds every RNG, creates --output_dir
    if settings.multi_label_implied:
        logger.info("--label_separator given: a multi-label run")

    # Build: the label set (given, or one pass over the training rows), then the classifier for it.
    reader = LabelReader(settings.label_column, settings.multi_label, settings.label_separator)
    labels = resolve_labels(settings.labels, training, reader, accelerator)
    logger.info(f"{len(labels)} labels ({'multi' if settings.multi_label else 'single'}-label): {labels[:20]}")
    model = build_model(settings, labels)
    config = model.config
    feature_extractor = M2D2FeatureExtractor.from_model_folder(settings.model_name_or_path, config)  # the encoder's
    batches = FinetuneBatches(settings, training.seed, feature_extractor, config, reader)
    streams = LabelledStreams(
        training, evaluation, accelerator, feature_extractor, reader, labels, settings.min_seconds
    )
    checkpoint, _ = resolve_checkpoint(training.resume_from_checkpoint, training.output_dir)

    # Prepare: SGD (or AdamW) over the layer-decay groups, timm's warm-up + cosine per step, the objective (the
    # classifier and its loss against soft targets) under accelerate, then resume.
    optimizer = build_optimizer(settings, training, model)
    min_ratio = MIN_LEARNING_RATE / optimizer.param_groups[0]["lr"]  # the original's floor, relative to the peak lr
    scheduler = timm_cosine_schedule(optimizer, training.warmup_steps, training.max_train_steps, min_ratio)
    objective, optimizer = accelerator.prepare(ClassificationObjective(model), optimizer)
    stream = loop.BatchStream(streams.train_loader(), accelerator.process_index)
    run = loop.TrainingRun(objective, optimizer, scheduler, stream, loop.RunState(list(feature_extractor.norm_stats)))
    record = settings_record(training, settings, evaluation)
    loop.start_run(accelerator, run, checkpoint, "m2d2_finetune", record)
    classifier = accelerator.unwrap_model(objective).model

    # Loop and export: evaluation every --eval_steps and at the end (when an evaluation split is given).
    card = loop.ExportCard("examples/finetune_audio_classification.py", record, [settings.model_name_or_path])
    stage = Finetune(accelerator, classifier, batches, streams, training.max_train_steps, card)
    objective.train()
    return loop.run_training(accelerator, training, run, stage)


if __name__ == "__main__":
    main()
