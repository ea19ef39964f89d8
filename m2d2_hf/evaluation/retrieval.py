"""Audio–text retrieval with an M2D2 CLAP model, as the original (EVAR `retr_a2t_t2a.py`; docs/method.md §7).

Every clip is embedded whole (CLAP audio embedding), every caption alone (see `embed_texts`), and the metrics are read
off the cosine similarities of all clips against all captions, computed in chunks of queries
(`metrics.retrieval_metrics`), in both directions: audio→text (a clip query is answered by any of its captions) and
text→audio (a caption has exactly one clip). R@1/5/10 and mAP@10 as WavCaps defines them; see
`metrics.ranking_metrics`.
"""

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from datasets import Dataset

from .data import AudioSource, EvaluationSet, caption_groups, embed_audio, embed_texts, unzip_lazily
from .metrics import RETRIEVAL_KS, retrieval_metrics


def evaluate_retrieval(
    model,
    processor,
    pairs: EvaluationSet | Dataset | Iterable[tuple[AudioSource, str | Sequence[str]]],
    batch_size: int = 8,
    text_batch_size: int = 1,
    caption_columns: Sequence[str] = ("caption",),
    ks: Sequence[int] = RETRIEVAL_KS,
    chunk_size: int = 1024,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Retrieval metrics of a CLAP model on audio–caption pairs.

    Args:
        model: an `M2D2ClapModel`.
        processor: its `M2D2Processor`.
        pairs: (audio, captions) per clip, captions a string or a list of strings; or an `EvaluationSet` /
            `datasets.Dataset` whose `caption_columns` hold the captions (rows of one audio file are merged).
        batch_size: clips per forward pass.
        text_batch_size: captions per forward pass; 1 (the default) encodes each caption alone, as the original.
        ks: recall cut-offs.
        chunk_size: queries scored at once (memory: [chunk_size, num_captions] similarities).

    Returns:
        `num_clips`, `num_captions`, and `audio_to_text` / `text_to_audio` dicts with `R@k`, `mAP@10`,
        `median_rank` and `mean_rank` (fractions, ranks 1-based).
    """
    if isinstance(pairs, Dataset):
        pairs = EvaluationSet.from_dataset(pairs)
    if isinstance(pairs, EvaluationSet):
        pairs = caption_groups(pairs, caption_columns)
    clips, caption_lists = unzip_lazily(pairs)
    audio_embeds = embed_audio(model, processor, clips, "clap", batch_size, device, progress)
    captions, caption_audio = [], []
    for clip, texts in enumerate(caption_lists):
        texts = [texts] if isinstance(texts, str) else list(texts)
        captions.extend(texts)
        caption_audio.extend([clip] * len(texts))
    text_embeds = embed_texts(model, processor, captions, text_batch_size, device, progress)
    # The similarities are computed where the model runs (10k clips × 50k captions is slow on a CPU).
    audio_embeds, text_embeds = audio_embeds.to(model.device), text_embeds.to(model.device)
    return {
        "num_clips": len(audio_embeds),
        "num_captions": len(captions),
        **retrieval_metrics(audio_embeds, text_embeds, caption_audio, ks, chunk_size),
    }


__all__ = ["evaluate_retrieval"]
