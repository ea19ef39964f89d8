"""Training utilities: streamed audio data, cached caption embeddings, optimiser schedules."""

from ..extras import require_extra


# ruff: noqa: E402 -- the imports below follow the extras check, so that a missing package names the extra
require_extra("train")

from ..data.audio import AudioDecodeError, decode_audio
from .captions import (
    CaptionEmbeddingTable,
    CaptionEncoder,
    cache_caption_embeddings,
    draw_captions,
    embed_captions,
    iter_caption_embeddings,
    read_captions,
)
from .data import (
    AudioBatchCollator,
    frames_of,
    load_audio_stream,
    random_log_mel_crops,
)


__all__ = [
    "AudioBatchCollator",
    "AudioDecodeError",
    "CaptionEmbeddingTable",
    "CaptionEncoder",
    "cache_caption_embeddings",
    "decode_audio",
    "draw_captions",
    "embed_captions",
    "frames_of",
    "iter_caption_embeddings",
    "load_audio_stream",
    "random_log_mel_crops",
    "read_captions",
]
