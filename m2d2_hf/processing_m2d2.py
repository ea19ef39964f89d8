"""Processor pairing the M2D2 feature extractor with the text tower's tokenizer."""

import inspect
import os

from transformers import BatchFeature
from transformers.processing_utils import AudioKwargs, ProcessingKwargs, ProcessorMixin, Unpack
from transformers.utils import logging

from .configuration_m2d2 import auto_map_kept_on_disk_only


logger = logging.get_logger(__name__)

# Tokenizers without a length limit report this (transformers' VERY_LARGE_INTEGER) as their model_max_length.
_NO_LIMIT = int(1e29)


class M2D2AudioKwargs(AudioKwargs, total=False):
    """[`M2D2FeatureExtractor`]'s own keyword: `mono=True` averages `[channels, samples]` clips to one channel."""

    mono: bool


class M2D2ProcessorKwargs(ProcessingKwargs, total=False):
    audio_kwargs: M2D2AudioKwargs


class M2D2Processor(ProcessorMixin):
    """Wraps an [`M2D2FeatureExtractor`] and a tokenizer (bert-base-uncased for the 2025 model) into one callable
    that prepares texts, audio, or both for [`M2D2ClapModel`].

    Keywords follow transformers' processors: `text_kwargs={...}` / `audio_kwargs={...}` go to the tokenizer / the
    feature extractor, and a plain keyword goes to whichever accepts it (`padding`, `max_length` to the tokenizer,
    `mono`, `sampling_rate` to the feature extractor, `return_tensors` to both). Defaults: texts padded to the
    longest, PyTorch tensors, and texts longer than the tokenizer's `model_max_length` (the text tower's positions)
    truncated to it with a warning.
    """

    valid_processor_kwargs = M2D2ProcessorKwargs
    text_kwargs = {"padding": True, "return_tensors": "pt"}
    audio_kwargs = {"return_tensors": "pt"}

    def __init__(self, feature_extractor, tokenizer):
        super().__init__(feature_extractor, tokenizer)

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs) -> list[str]:
        """Saves the tokenizer and `processor_config.json` (with the `auto_map` for `trust_remote_code` loading);
        unlike transformers' default, saving adds that `auto_map` neither to the processor nor to its feature
        extractor, so their `to_dict()` is unchanged."""
        with auto_map_kept_on_disk_only(self), auto_map_kept_on_disk_only(self.feature_extractor):
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def __call__(
        self, text: str | list[str] | None = None, audio=None, **kwargs: Unpack[M2D2ProcessorKwargs]
    ) -> BatchFeature:
        """Tokenises `text` and/or turns `audio` (see [`M2D2FeatureExtractor.__call__`], any sampling rate) into
        normalised log-mel features."""
        if text is None and audio is None:
            raise ValueError("M2D2Processor needs `text`, `audio`, or both")
        merged = self._merge_kwargs(M2D2ProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        data = {}
        if text is not None:
            text_kwargs = merged["text_kwargs"]
            if text_kwargs.get("truncation") is None:
                explicit = "max_length" in kwargs or "max_length" in kwargs.get("text_kwargs", {})
                if not explicit and text_kwargs.get("padding") in (True, "longest"):
                    # The merge copies the tokenizer's saved `max_length` into every call, where, padding to the
                    # longest text without truncation, the tokenizer ignores it with a warning on each query.
                    text_kwargs.pop("max_length", None)
                self._truncate_overlong(text, text_kwargs)
            data.update(self.tokenizer(text, **text_kwargs))
        if audio is not None:
            data.update(
                self.feature_extractor(audio, **self._feature_extractor_kwargs(merged["audio_kwargs"], kwargs))
            )
        return_tensors = merged["text_kwargs" if text is not None else "audio_kwargs"].get("return_tensors")
        return BatchFeature(data, tensor_type=return_tensors)

    def _feature_extractor_kwargs(self, audio_kwargs: dict, call_kwargs: dict) -> dict:
        """The merged audio keywords the feature extractor takes. transformers' merge also copies the tokenizer's
        init settings (e.g. `max_length`) and text keywords such as `padding` into the audio keywords; the
        feature extractor has no use for them (it always pads to the longest clip), so only what its `__call__`
        names, and what the caller sent in `audio_kwargs` explicitly, are passed on."""
        accepted = set(inspect.signature(self.feature_extractor.__call__).parameters) | set(
            call_kwargs.get("audio_kwargs", {})
        )
        return {key: value for key, value in audio_kwargs.items() if key in accepted}

    def _truncate_overlong(self, text: str | list[str], text_kwargs: dict) -> None:
        """Unless the caller chose a truncation, texts longer than the text tower's positions (the tokenizer's
        `model_max_length`) are cut to it with a warning, instead of failing inside the text model."""
        limit = self.tokenizer.model_max_length
        if limit is None or limit >= _NO_LIMIT:
            return
        texts = [text] if isinstance(text, str) else list(text)
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]
        overlong = [i for i, length in enumerate(lengths) if length > limit]
        if overlong:
            logger.warning(
                f"M2D2Processor: text(s) {overlong} have {max(lengths)} tokens, more than the text tower's {limit} "
                f"positions: truncated to {limit} tokens. Pass `truncation=False` to keep them whole (the text "
                f"model then fails), or shorten them."
            )
            text_kwargs["truncation"] = True
            text_kwargs["max_length"] = limit


__all__ = ["M2D2Processor"]
