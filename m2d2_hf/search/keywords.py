"""Keyword scores for hybrid ranking: BM25 (the `bm25s` package) over each sound's text (its file name and the
text columns of its metadata), and reciprocal-rank fusion of a keyword ranking with the dense one."""

import re
from collections.abc import Sequence

import numpy as np

from ..extras import install_hint


# Reciprocal-rank fusion's constant (Cormack, Clarke and Buettcher's): a sound's fused score is the sum over the
# rankings of 1 / (RRF_K + its rank there), so that the first places of either ranking count, and deep ranks barely.
RRF_K = 60
_WORD = re.compile(r"[^\W_]+")


def words(text: str) -> list[str]:
    """Lower-case words of `text`, split at anything not a letter or digit (file names' `_`, `-`, `.` and `/`
    too): `dog_barking-01.wav` is `dog barking 01 wav`."""
    return _WORD.findall(text.lower())


class KeywordIndex:
    """BM25 over one text per sound (`texts[sound_id]`)."""

    def __init__(self, texts: Sequence[str]):
        try:
            import bm25s
        except ImportError as error:
            raise ImportError(
                f"hybrid ranking needs bm25s: {install_hint('search')} (or drop --hybrid / hybrid=true)"
            ) from error
        self.size = len(texts)
        self.bm25 = bm25s.BM25()
        self.bm25.index([words(text) for text in texts], show_progress=False)
        self.vocabulary = set(self.bm25.vocab_dict)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score [sounds] of every sound for `query` (0 where it shares no word with it)."""
        known = [word for word in words(query) if word in self.vocabulary]
        if not known:
            return np.zeros(self.size, np.float32)
        return np.asarray(self.bm25.get_scores(known), dtype=np.float32)


def keyword_ranking(scores: np.ndarray, candidates: np.ndarray, depth: int) -> np.ndarray:
    """The `depth` best of the sounds `candidates` by keyword score, best first (ties by sound id), leaving out those
    without a word in common with the query."""
    candidates = candidates[scores[candidates] > 0]
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:depth]]


def fused_scores(rankings: Sequence[Sequence[int]]) -> dict[int, float]:
    """Reciprocal-rank fusion of rankings of sound ids (best first): sound id -> fused score."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, sound in enumerate(ranking, 1):
            fused[int(sound)] = fused.get(int(sound), 0.0) + 1.0 / (RRF_K + rank)
    return fused


__all__ = ["RRF_K", "KeywordIndex", "fused_scores", "keyword_ranking", "words"]
