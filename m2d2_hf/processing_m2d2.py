"""Processor pairing the M2D2 feature extractor with the text tower's tokenizer."""

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin


class M2D2Processor(ProcessorMixin):
    """Wraps an [`M2D2FeatureExtractor`] and a tokenizer (bert-base-uncased for the 2025 model) into one callable
    that prepares texts, audio, or both for [`M2D2ClapModel`]."""

    def __init__(self, feature_extractor, tokenizer):
        super().__init__(feature_extractor, tokenizer)

    def __call__(
        self,
        text: str | list[str] | None = None,
        audio=None,
        sampling_rate: int | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = True,
        **kwargs,
    ) -> BatchFeature:
        """Tokenises `text` (padding to the longest, no truncation, as the original) and/or turns `audio` (see
        [`M2D2FeatureExtractor.__call__`], any sampling rate) into normalised log-mel features."""
        if text is None and audio is None:
            raise ValueError("M2D2Processor needs `text`, `audio`, or both")
        data = {}
        if text is not None:
            data.update(self.tokenizer(text, padding=padding, return_tensors=return_tensors, **kwargs))
        if audio is not None:
            data.update(self.feature_extractor(audio, sampling_rate=sampling_rate, return_tensors=return_tensors))
        return BatchFeature(data, tensor_type=return_tensors)


__all__ = ["M2D2Processor"]
