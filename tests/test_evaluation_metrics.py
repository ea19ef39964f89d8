"""The evaluation metrics against values computed by hand on tiny score matrices and label sets."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from m2d2_hf.evaluation.metrics import (
    audio_to_text_metrics,
    average_precision_per_class,
    mean_average_precision,
    per_class_accuracy,
    ranking_metrics,
    ranks_of,
    retrieval_metrics,
    text_to_audio_metrics,
    top_k_accuracy,
)


# ---------------------------------------------------------------------------------------------------------------------
# Ranks and classification
# ---------------------------------------------------------------------------------------------------------------------


def test_ranks_follow_a_stable_descending_sort():
    # Integer scores in 0..3 over 40 candidates: many ties. The rank of candidate j must be its 1-based position in
    # numpy's stable sort of the negated scores (ties: lower index first).
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(6, 40)).astype(np.float32)
    items = rng.integers(0, 40, size=(6, 3))
    positions = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1) + 1
    expected = np.take_along_axis(positions, items, axis=1)
    assert ranks_of(torch.from_numpy(scores), torch.from_numpy(items)).numpy().tolist() == expected.tolist()


SCORES = [
    [0.1, 0.5, 0.4],  # target 1: highest → rank 1
    [0.3, 0.3, 0.2],  # target 1: tied with class 0, which has the lower index → rank 2
    [0.2, 0.2, 0.2],  # target 0: three-way tie, lowest index → rank 1
    [0.9, 0.05, 0.05],  # target 2: behind class 0 (higher) and class 1 (tie, lower index) → rank 3
]
TARGETS = [1, 1, 0, 2]


@pytest.mark.parametrize(
    "k, expected",
    [
        (1, 2 / 4),  # rows 0 and 2
        (2, 3 / 4),  # rows 0, 1 and 2
        (3, 4 / 4),
    ],
)
def test_top_k_accuracy_by_hand(k, expected):
    assert top_k_accuracy(SCORES, TARGETS, k) == pytest.approx(expected)


def test_top_1_accuracy_is_argmax_accuracy():
    # torch.argmax returns the first maximum: row 1 → class 0 (wrong), row 2 → class 0 (right).
    predictions = torch.tensor(SCORES).argmax(1)
    assert top_k_accuracy(SCORES, TARGETS, 1) == float((predictions == torch.tensor(TARGETS)).double().mean())


def test_per_class_accuracy_by_hand():
    # class 0: clips 1 and 3, predicted 0 and 1 → 1/2; class 1: clip 0, predicted 1 → 1; class 2: clip 2,
    # predicted 0 → 0; class 3: no clip → None.
    assert per_class_accuracy([1, 0, 0, 1], [1, 0, 2, 0], 4) == [0.5, 1.0, 0.0, None]


def test_average_precision_by_hand():
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]])
    scores = np.array([[0.9, 0.2, 0.5], [0.8, 0.4, 0.1], [0.3, 0.6, 0.7], [0.1, 0.7, 0.2]])
    # class 0, ranked: clip 0 (+), clip 1 (-), clip 2 (+), clip 3 (-) → AP = (1/1 + 2/3) / 2 = 5/6
    # class 1, ranked: clip 3 (-), clip 2 (-), clip 1 (+), clip 0 (-) → AP = 1/3
    # class 2: no positive clip → undefined (None), left out of the mean
    per_class = average_precision_per_class(scores, targets)
    assert per_class[0] == pytest.approx(5 / 6)
    assert per_class[1] == pytest.approx(1 / 3)
    assert per_class[2] is None
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1 / 3) / 2)  # 7/12
    # Where every class has a positive, the number is sklearn's macro average (the original's).
    assert mean_average_precision(scores[:, :2], targets[:, :2]) == pytest.approx(
        average_precision_score(targets[:, :2], scores[:, :2], average="macro")
    )


def test_average_precision_with_tied_scores():
    # Tied scores form one threshold (sklearn's semantics): at 0.5, precision 2/3 at recall 1 → AP = 2/3.
    # A rank-by-rank reading of the ties would give (1/1 + 2/3)/2 or (1/2 + 2/3)/2 depending on tie order.
    targets = np.array([[1], [0], [1], [0]])
    scores = np.array([[0.5], [0.5], [0.5], [0.1]])
    assert average_precision_per_class(scores, targets)[0] == pytest.approx(2 / 3)


def test_mean_average_precision_ignores_monotone_transforms():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(20, 4))
    targets = (rng.random((20, 4)) < 0.4).astype(int)
    targets[0] = 1  # every class has a positive
    sigmoid = 1 / (1 + np.exp(-scores))
    assert mean_average_precision(scores, targets) == pytest.approx(mean_average_precision(sigmoid, targets))


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------------------

# 3 clips × 13 captions. Clip 0 has captions {0, 1}, clip 1 {2, 3, 4}, clip 2 {5, ..., 12}.
CAPTION_AUDIO = [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2]
SIMILARITY = np.array(
    [
        # ranks of the captions: 1→1, 5→2, 0→3, then 2, 3, 4, 6, ..., 12
        [0.85, 0.95, 0.60, 0.55, 0.50, 0.90, 0.45, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15],
        # the clip's captions 2, 3, 4 come last: ranks 11, 12, 13 (ten captions score higher)
        [0.90, 0.90, 0.10, 0.05, 0.00, 0.80, 0.75, 0.70, 0.65, 0.60, 0.55, 0.50, 0.45],
        # order: 0 (1.0), 2 and 6 tied at 0.8 (2 first: lower index), 5, 7, 8, 9, 10, 11, 1, 12 (0.09), 3, 4
        [1.00, 0.10, 0.80, 0.05, 0.02, 0.70, 0.80, 0.60, 0.50, 0.40, 0.30, 0.20, 0.09],
    ]
)


def test_audio_to_text_by_hand():
    # Ranks of the relevant captions per clip query:
    #   clip 0: caption 1 → 1, caption 0 → 3                         best 1
    #   clip 1: captions 2, 3, 4 → 11, 12, 13 (all beyond 10)          best 11
    #   clip 2: caption 6 → 3 (behind 0 and the tied 2), 5 → 4, 7 → 5, 8 → 6, 9 → 7, 10 → 8, 11 → 9,
    #           12 → 11 (beyond 10)                                    best 3
    # AP@10 = (1/|R|) Σ over relevant captions within the top 10 of (relevant within the top r) / r:
    #   clip 0: (1/1 + 2/3) / 2
    #   clip 1: 0
    #   clip 2: (1/3 + 2/4 + 3/5 + 4/6 + 5/7 + 6/8 + 7/9) / 8   (divided by all 8 relevant captions, not the 7 found)
    ap = [(1 / 1 + 2 / 3) / 2, 0.0, (1 / 3 + 2 / 4 + 3 / 5 + 4 / 6 + 5 / 7 + 6 / 8 + 7 / 9) / 8]
    metrics = audio_to_text_metrics(SIMILARITY, CAPTION_AUDIO)
    assert metrics["R@1"] == pytest.approx(1 / 3)  # best ranks 1, 11, 3
    assert metrics["R@5"] == pytest.approx(2 / 3)
    assert metrics["R@10"] == pytest.approx(2 / 3)
    assert metrics["mAP@10"] == pytest.approx(sum(ap) / 3)
    assert metrics["median_rank"] == 3
    assert metrics["mean_rank"] == pytest.approx((1 + 11 + 3) / 3)


def test_text_to_audio_by_hand():
    # Each caption's column, ranked over the 3 clips; rank of its own clip:
    #   0: (.85, .90, 1.0) target 0 → 3      1: (.95, .90, .10) target 0 → 1
    #   2: (.60, .10, .80) target 1 → 3      3: (.55, .05, .05) target 1 → 2 (tied with clip 2, lower index first)
    #   4: (.50, .00, .02) target 1 → 3      5: (.90, .80, .70) target 2 → 3
    #   6: (.45, .75, .80) target 2 → 1      7, 8, 9, 10: target 2 below clip 1 only → 2
    #  11: (.20, .50, .20) target 2 → 3 (tied with clip 0, which comes first)
    #  12: (.15, .45, .09) target 2 → 3
    # ranks: two 1s, five 2s, six 3s.
    metrics = text_to_audio_metrics(SIMILARITY, CAPTION_AUDIO)
    assert metrics["R@1"] == pytest.approx(2 / 13)
    assert metrics["R@5"] == 1.0
    assert metrics["R@10"] == 1.0
    # AP@10 of one relevant clip = 1 / rank: (2·1 + 5·1/2 + 6·1/3) / 13 = 6.5 / 13
    assert metrics["mAP@10"] == pytest.approx(0.5)
    assert metrics["median_rank"] == 2  # 7th of [1, 1, 2, 2, 2, 2, 2, 3, ...]
    assert metrics["mean_rank"] == pytest.approx((2 * 1 + 5 * 2 + 6 * 3) / 13)


def test_retrieval_rejects_a_clip_without_caption():
    with pytest.raises(ValueError, match="no caption"):
        audio_to_text_metrics(SIMILARITY, [0] * 13)


def random_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """37 clips, 53 captions (every clip has one or two), random unit embeddings."""
    generator = torch.Generator().manual_seed(seed)
    caption_audio = torch.cat([torch.arange(37), torch.randint(0, 37, (16,), generator=generator)])
    caption_audio = caption_audio[torch.randperm(53, generator=generator)]
    audio = torch.nn.functional.normalize(torch.randn(37, 8, generator=generator, dtype=torch.float64), dim=1)
    text = torch.nn.functional.normalize(torch.randn(53, 8, generator=generator, dtype=torch.float64), dim=1)
    return audio, text, caption_audio


@pytest.mark.parametrize("chunk_size", [1, 5, 100])
def test_chunked_equals_unchunked(chunk_size):
    audio, text, caption_audio = random_problem()
    similarity = audio @ text.T
    whole = {
        "audio_to_text": audio_to_text_metrics(similarity, caption_audio, chunk_size=10_000),
        "text_to_audio": text_to_audio_metrics(similarity, caption_audio, chunk_size=10_000),
    }
    chunked = {
        "audio_to_text": audio_to_text_metrics(similarity, caption_audio, chunk_size=chunk_size),
        "text_to_audio": text_to_audio_metrics(similarity, caption_audio, chunk_size=chunk_size),
    }
    assert chunked == whole
    from_embeddings = retrieval_metrics(audio, text, caption_audio, chunk_size=chunk_size)
    for direction in whole:
        assert from_embeddings[direction] == pytest.approx(whole[direction])


def test_scores_are_read_one_chunk_at_a_time():
    audio, text, caption_audio = random_problem()
    similarity = audio @ text.T
    requested = []

    def rows(start: int, stop: int) -> torch.Tensor:
        requested.append((start, stop))
        return similarity[start:stop]

    groups = [torch.nonzero(caption_audio == clip).flatten().tolist() for clip in range(37)]
    metrics = ranking_metrics(rows, groups, chunk_size=5)
    assert requested == [(start, min(start + 5, 37)) for start in range(0, 37, 5)]
    assert metrics == audio_to_text_metrics(similarity, caption_audio)


def test_retrieval_of_perfect_embeddings():
    # Captions identical to their clip's embedding: every query finds its match first.
    audio, _, caption_audio = random_problem()
    metrics = retrieval_metrics(audio, audio[caption_audio], caption_audio)
    assert metrics["text_to_audio"]["R@1"] == 1.0
    assert metrics["text_to_audio"]["mAP@10"] == 1.0
    assert metrics["audio_to_text"]["R@1"] == 1.0
    # A clip with two identical captions holds ranks 1 and 2: AP = (1/1 + 2/2) / 2 = 1.
    assert metrics["audio_to_text"]["mAP@10"] == pytest.approx(1.0)
