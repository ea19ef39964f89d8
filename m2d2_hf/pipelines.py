"""transformers' audio pipelines, batching M2D2 features of different lengths.

The pipelines' batch collation (`transformers.pipelines.base.pad_collate_fn`) pads every 3-D input along axis 1, the
time axis of time-major features ([batch, frames, bins], as AST or Speech2Text emit). M2D2 features are
[batch, mel bins, frames], so `batch_size > 1` over clips of different lengths fails inside the collation. These
subclasses hand the collation time-major features and give the model its own layout back; everything else is
transformers' pipeline. Padded frames carry the feature extractor's `padding_value` and a 0 in
`input_features_mask`, so every clip gets the scores of a call on its own.

    from transformers import pipeline
    from m2d2_hf.pipelines import M2D2ZeroShotAudioClassificationPipeline
    classifier = pipeline("zero-shot-audio-classification", model=folder, batch_size=8,
                          pipeline_class=M2D2ZeroShotAudioClassificationPipeline)
"""

from typing import Any

from transformers import AudioClassificationPipeline, ZeroShotAudioClassificationPipeline


class _TimeMajorBatching:
    """Transposes `input_features` to [1, frames, bins] after preprocessing and back before the model."""

    def preprocess(self, *args, **kwargs) -> dict[str, Any]:
        inputs = super().preprocess(*args, **kwargs)
        inputs["input_features"] = inputs["input_features"].transpose(1, 2)
        return inputs

    def _forward(self, model_inputs: dict[str, Any], *args, **kwargs) -> dict[str, Any]:
        model_inputs["input_features"] = model_inputs["input_features"].transpose(1, 2)
        return super()._forward(model_inputs, *args, **kwargs)


class M2D2ZeroShotAudioClassificationPipeline(_TimeMajorBatching, ZeroShotAudioClassificationPipeline):
    """`zero-shot-audio-classification` over an M2D2 CLAP folder, with `batch_size > 1` over any clip lengths."""


class M2D2AudioClassificationPipeline(_TimeMajorBatching, AudioClassificationPipeline):
    """`audio-classification` over an M2D2ForAudioClassification folder, with `batch_size > 1` over any lengths."""


__all__ = ["M2D2AudioClassificationPipeline", "M2D2ZeroShotAudioClassificationPipeline"]
