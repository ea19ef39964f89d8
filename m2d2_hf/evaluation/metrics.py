"""Classification and retrieval metrics of the evaluation suite (numpy / torch, no model code).

Conventions shared by every function here:

* **Ranks** are 1-based and follow a *stable* descending sort of the scores: an item ranks behind every item with a
  strictly higher score and behind every item with an *equal* score and a lower index. So rank 1 is exactly what
  `argmax` picks (the first maximum), and ties never make a result depend on the sort implementation.
* Scores are fractions in [0, 1] (not percentages).

Libraries: average precision is `sklearn.metrics.average_precision_score`, which is what the original evaluation
(EVAR) calls. Top-k accuracy and the retrieval metrics stay here, for reasons given at each; the package's
`evaluate` modules (`metric_modules/`) wrap these functions, because `evaluate.load("accuracy")` and the other Hub
metrics fetch their scripts from the Hugging Face Hub and fail offline.
"""

from collections.abc import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import average_precision_score


ArrayLike = np.ndarray | torch.Tensor | Sequence

# Reads the scores of queries [start, stop) against all candidates: a [stop - start, num_candidates] tensor.
RowScores = Callable[[int, int], torch.Tensor]

RETRIEVAL_KS = (1, 5, 10)
MAP_CUTOFF = 10


def _as_tensor(values: ArrayLike, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    return tensor if dtype is None else tensor.to(dtype)


def ranks_of(scores: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """1-based ranks of `items` [Q, M] (candidate indices) within each row of `scores` [Q, N].

    Rank = 1 + #(candidates with a higher score) + #(candidates with an equal score and a lower index): the position
    in a stable descending sort. Memory: one [Q, N] boolean at a time (one column of `items` per step), never
    [Q, M, N] and no sort.
    """
    item_scores = scores.gather(1, items)
    candidate = torch.arange(scores.shape[1], device=scores.device)
    ranks = torch.empty_like(items)
    for column in range(items.shape[1]):
        score = item_scores[:, column : column + 1]
        ahead = (scores > score) | ((scores == score) & (candidate < items[:, column : column + 1]))
        ranks[:, column] = ahead.sum(1) + 1
    return ranks


# ---------------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------------


def top_k_accuracy(scores: ArrayLike, targets: ArrayLike, k: int = 1) -> float:
    """Fraction of rows of `scores` [N, C] whose target class (`targets` [N], class indices) ranks within the top k.

    Ties follow the module's rank rule, so top-1 accuracy is the accuracy of `argmax` (first maximum wins).

    Not `sklearn.metrics.top_k_accuracy_score`, although it gives the same numbers on untied scores
    (tests/test_library_equivalence.py): it breaks ties the other way (the later class ranks first, from a stable
    ascending sort reversed), so a tie would score top-1 differently from `argmax`, and it takes two-class scores
    only as one column. One rank rule (`ranks_of`) serves this and the retrieval metrics.
    """
    scores = _as_tensor(scores)
    targets = _as_tensor(targets, torch.long).reshape(-1, 1)
    if scores.ndim != 2 or scores.shape[0] != targets.shape[0]:
        raise ValueError(
            f"scores must be [N, C] with one target per row, got {tuple(scores.shape)} and {targets.shape[0]} targets"
        )
    return float((ranks_of(scores, targets) <= k).double().mean())


def per_class_accuracy(predictions: ArrayLike, targets: ArrayLike, num_classes: int) -> list[float | None]:
    """Per class c, the fraction of clips of class c predicted as c; None for a class without clips."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    return [
        float(np.mean(predictions[targets == c] == c)) if np.any(targets == c) else None for c in range(num_classes)
    ]


def average_precision_per_class(scores: ArrayLike, targets: ArrayLike) -> list[float | None]:
    """`sklearn.metrics.average_precision_score` of each class (column) of `scores` [N, C] against the multi-hot
    `targets` [N, C]; None for a class with no positive clip, whose AP is undefined (sklearn would warn and
    return 0)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores and multi-hot targets must both be [N, C], got {scores.shape} and {targets.shape}")
    return [
        float(average_precision_score(targets[:, c], scores[:, c])) if targets[:, c].any() else None
        for c in range(scores.shape[1])
    ]


def mean_average_precision(scores: ArrayLike, targets: ArrayLike) -> float:
    """Macro mAP: the mean over classes of `average_precision_per_class`, skipping classes without positives.

    When every class has a positive (true of the FSD50K and AudioSet evaluation sets) this equals
    `average_precision_score(targets, scores, average="macro")`, the original's number. Only the order of the scores
    within a class matters, so cosine similarities and their sigmoid give the same value.
    """
    defined = [ap for ap in average_precision_per_class(scores, targets) if ap is not None]
    if not defined:
        raise ValueError("mAP is undefined: no class has a positive example")
    return float(np.mean(defined))


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------------------


def ranking_metrics(
    row_scores: RowScores,
    relevant: Sequence[Sequence[int]],
    ks: Sequence[int] = RETRIEVAL_KS,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Retrieval metrics of `len(relevant)` queries, reading their scores `chunk_size` queries at a time.

    Hand-written rather than sklearn's ranking metrics (`label_ranking_average_precision_score`, `ndcg_score`,
    `top_k_accuracy_score`), which take the dense [Q, N] score and relevance matrices: for AudioCaps / Clotho-size
    sets, 10k clips × 50k captions, that is 2 GB of float32 scores plus the relevance matrix, where this reads
    `chunk_size` rows at a time; and they define neither recall@k over several relevant items nor mAP@10.

    Args:
        row_scores: `row_scores(start, stop)` gives the scores [stop - start, N] of those queries against all N
            candidates (a slice of a similarity matrix, or a product of embeddings computed on demand).
        relevant: for each query, the indices of its relevant candidates (at least one, no duplicates).
        ks: cut-offs of the recalls.
        chunk_size: queries scored at once; peak memory is a few [chunk_size, N] tensors.

    Returns:
        `R@k`: fraction of queries with at least one relevant candidate within the top k (rank of the best relevant
        candidate ≤ k); `mAP@10`: mean over queries of AP@10 = (1 / |R|) · Σ_{relevant j ranked ≤ 10} P@rank(j),
        with P@r = (relevant candidates within the top r) / r and |R| the query's number of relevant candidates (all
        of them, also those beyond rank 10); `median_rank`, `mean_rank`: of the best relevant candidate.
        With one relevant candidate, AP@10 = 1 / rank if rank ≤ 10 else 0.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if any(len(items) == 0 for items in relevant):
        raise ValueError("every query needs at least one relevant candidate")
    best_ranks, average_precisions = [], []
    for start in range(0, len(relevant), chunk_size):
        stop = min(start + chunk_size, len(relevant))
        scores = row_scores(start, stop)
        group = relevant[start:stop]
        width = max(len(items) for items in group)
        # Queries with fewer relevant candidates repeat their first one; the repeats are masked out below.
        items = torch.tensor(
            [list(items) + [items[0]] * (width - len(items)) for items in group], device=scores.device
        )
        valid = torch.tensor([[j < len(items) for j in range(width)] for items in group], device=scores.device)
        ranks = ranks_of(scores, items).masked_fill(~valid, torch.iinfo(torch.long).max).sort(dim=1).values
        best_ranks.append(ranks[:, 0].cpu())
        # After sorting, the i-th (1-based) relevant candidate sits at ranks[:, i-1] with exactly i relevant
        # candidates at or above it, so its precision is i / rank.
        hits = ranks <= MAP_CUTOFF
        order = torch.arange(1, width + 1, device=scores.device, dtype=torch.float64)
        precision = torch.where(hits, order / ranks.double(), 0.0)
        average_precisions.append((precision.sum(1) / valid.sum(1)).cpu())
    best = torch.cat(best_ranks).double()
    metrics = {f"R@{k}": float((best <= k).double().mean()) for k in ks}
    metrics[f"mAP@{MAP_CUTOFF}"] = float(torch.cat(average_precisions).mean())
    metrics["median_rank"] = float(np.median(best.numpy()))  # the mean of the two middle ranks for an even count
    metrics["mean_rank"] = float(best.mean())
    return metrics


def _caption_groups(caption_audio: torch.Tensor, num_audio: int) -> list[list[int]]:
    """The caption indices of each clip, in caption order."""
    groups: list[list[int]] = [[] for _ in range(num_audio)]
    for caption, audio in enumerate(caption_audio.tolist()):
        if not 0 <= audio < num_audio:
            raise ValueError(f"caption {caption} refers to clip {audio}, but there are {num_audio} clips")
        groups[audio].append(caption)
    missing = [audio for audio, captions in enumerate(groups) if not captions]
    if missing:
        raise ValueError(f"clips {missing[:10]} have no caption: audio-to-text retrieval needs one per clip")
    return groups


def audio_to_text_metrics(
    similarity: ArrayLike, caption_audio: ArrayLike, ks: Sequence[int] = RETRIEVAL_KS, chunk_size: int = 1024
) -> dict[str, float]:
    """Audio→text retrieval on `similarity` [num_audio, num_captions]; `caption_audio[j]` is the clip caption j
    describes. A clip query is relevant to all of its captions (see `ranking_metrics` for the definitions)."""
    similarity = _as_tensor(similarity)
    groups = _caption_groups(_as_tensor(caption_audio, torch.long), similarity.shape[0])
    return ranking_metrics(lambda start, stop: similarity[start:stop], groups, ks, chunk_size)


def text_to_audio_metrics(
    similarity: ArrayLike, caption_audio: ArrayLike, ks: Sequence[int] = RETRIEVAL_KS, chunk_size: int = 1024
) -> dict[str, float]:
    """Text→audio retrieval on `similarity` [num_audio, num_captions] (the same matrix as `audio_to_text_metrics`):
    each caption query has exactly one relevant clip, `caption_audio[j]`."""
    similarity = _as_tensor(similarity)
    targets = _as_tensor(caption_audio, torch.long)
    _caption_groups(targets, similarity.shape[0])
    return ranking_metrics(lambda start, stop: similarity[:, start:stop].T, targets[:, None].tolist(), ks, chunk_size)


def retrieval_metrics(
    audio_embeds: ArrayLike,
    text_embeds: ArrayLike,
    caption_audio: ArrayLike,
    ks: Sequence[int] = RETRIEVAL_KS,
    chunk_size: int = 1024,
) -> dict[str, dict[str, float]]:
    """Both directions from embeddings [num_audio, D] and [num_captions, D] (L2-normalised, so the dot product is the
    cosine). Similarities are computed per chunk of queries, so the full matrix (10k × 50k = 2 GB in float32) never
    exists; only [chunk_size, num_captions] or [chunk_size, num_audio] at a time."""
    audio, text = _as_tensor(audio_embeds), _as_tensor(text_embeds)
    targets = _as_tensor(caption_audio, torch.long)
    groups = _caption_groups(targets, audio.shape[0])
    return {
        "audio_to_text": ranking_metrics(lambda start, stop: audio[start:stop] @ text.T, groups, ks, chunk_size),
        "text_to_audio": ranking_metrics(
            lambda start, stop: text[start:stop] @ audio.T, targets[:, None].tolist(), ks, chunk_size
        ),
    }


__all__ = [
    "audio_to_text_metrics",
    "average_precision_per_class",
    "mean_average_precision",
    "per_class_accuracy",
    "ranking_metrics",
    "ranks_of",
    "retrieval_metrics",
    "text_to_audio_metrics",
    "top_k_accuracy",
]
