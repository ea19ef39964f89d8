"""`SoundIndex`: search an index folder by text or by example, ranking sounds with their best-matching moment.

A query's embedding is compared with every vector (clip and window embeddings) through FAISS; the candidate
sounds are the distinct sounds of the nearest vectors, and each is then scored exactly over all of its own vectors:
its score is its best vector's, its time range the best window's (the whole sound when it has no windows).
"""

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.audio import decode_audio
from .building import ITEMS_FILE, META_FILE, VECTORS_FILE, DamagedIndexError, embeddings_of, read_index_meta
from .embedding import clip_embeddings, load_clap_model, model_fingerprint, text_embeddings
from .vector_index import read_vector_index


@dataclass
class SearchHit:
    """One ranked sound: its key (file path or dataset row), local path (None for dataset rows), cosine score,
    best-matching time range and duration (seconds), and its number in the index (`sound_id`)."""

    rank: int
    key: str
    path: str | None
    score: float
    start: float
    end: float
    duration: float
    sound_id: int

    def to_dict(self) -> dict:
        return asdict(self)


class ModelMismatchError(ValueError):
    """The query model is not the one the index was built with."""


class SoundIndex:
    """
    An index folder made by `build_index`, with the model that built it. The folder is checked first (cheaply:
    `read_index_meta`), so that a damaged one is a `DamagedIndexError` naming the file rather than a failure deep in
    FAISS or Parquet, or a silently wrong ranking.

    Args:
        folder: the index folder.
        model: the model folder / hub id to embed queries with (default: the one recorded in the index). It must be
            the model the index was built with (same config and weights hashes), else `ModelMismatchError`.
        device: torch device for the queries (default: cpu).
    """

    def __init__(self, folder: str | os.PathLike, model: str | None = None, device: str | torch.device = "cpu"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        self.meta = read_index_meta(self.folder)
        recorded = self.meta["model"]
        # A local model is recorded by its absolute path; a hub id is never one.
        if model is None and os.path.isabs(recorded["name"]) and not os.path.exists(recorded["name"]):
            raise ValueError(
                f"the model folder {recorded['name']} that {self.folder / META_FILE} records is gone: pass the model "
                "with --model MODEL_DIR (a copy of it; its config and weights hashes are checked)"
            )
        try:
            table = pq.read_table(self.folder / ITEMS_FILE)
        except (pa.ArrowException, OSError) as error:  # the footer read well, the data did not
            raise DamagedIndexError(self.folder, f"{self.folder / ITEMS_FILE} cannot be read ({error})") from error
        self.embeddings = embeddings_of(table)
        columns = {name: table.column(name).to_pylist() for name in ("key", "path", "kind")}
        self.starts, self.ends = (table.column(name).to_numpy() for name in ("start", "end"))
        self.durations = table.column("duration").to_numpy()
        keys = columns["key"]
        # Rows of one sound are contiguous (clip first, then its windows in time order).
        first = [row for row in range(len(keys)) if row == 0 or keys[row] != keys[row - 1]]
        self.sound_rows = list(zip(first, first[1:] + [len(keys)]))
        self.sound_keys = [keys[row] for row in first]
        self.sound_paths = [columns["path"][row] for row in first]
        self.sound_of_row = np.repeat(np.arange(len(first)), [end - start for start, end in self.sound_rows])
        self.is_window = np.asarray([kind == "window" for kind in columns["kind"]])
        faiss_info = self.meta["faiss"]
        try:
            self.vectors = read_vector_index(str(self.folder / VECTORS_FILE), faiss_info["type"], faiss_info["params"])
        except ValueError as error:
            raise DamagedIndexError(self.folder, str(error)) from error
        # The model last: the folder's files are read (and any damage found) without waiting for it.
        self.model, self.processor = load_clap_model(model or recorded["name"], device)
        found = model_fingerprint(self.model, model or recorded["name"])
        if (found.config_hash, found.weights_hash) != (recorded["config_hash"], recorded["weights_hash"]):
            raise ModelMismatchError(
                f"{self.folder} was built with the model {recorded['name']} (config hash {recorded['config_hash']}, "
                f"weights hash {recorded['weights_hash']}) but {found.name} has config hash {found.config_hash} and "
                f"weights hash {found.weights_hash}: its embeddings are not comparable. Search with the model the "
                "index was built with, or rebuild the index with `m2d2-hf index` and this model."
            )
        self.rate = self.processor.feature_extractor.sampling_rate
        self.window_samples = int(round(self.meta["window_seconds"] * self.rate))
        self._lock = threading.Lock()  # one query at a time through the model (the web app serves threads)

    def __len__(self) -> int:
        return len(self.sound_keys)

    def sound_stamps(self) -> list[str | None]:
        """The stamp of each sound when it was indexed (a file's `size:mtime_ns`, see `sources.stat_stamp`), read
        from items.parquet; None for every sound of an index without a stamp column."""
        import pyarrow.parquet as pq

        path = self.folder / ITEMS_FILE
        if "stamp" not in pq.read_schema(path).names:
            return [None] * len(self)
        stamps = pq.read_table(path, columns=["stamp"]).column("stamp").to_pylist()
        if len(stamps) != len(self.sound_of_row):
            raise ValueError(f"{path} changed since this index was opened: open the index again")
        return [stamps[start] for start, _ in self.sound_rows]

    def embed_text(self, queries: list[str]) -> np.ndarray:
        if not queries or any(not isinstance(q, str) or not q.strip() for q in queries):
            raise ValueError("text queries must be non-empty strings")
        with self._lock:
            return text_embeddings(self.model, self.processor, queries)

    def embed_audio(self, audio: Any, sampling_rate: int | None = None) -> np.ndarray:
        """[1, D] embedding of one example: a file path, encoded bytes, or a mono array at `sampling_rate`,
        embedded as the index's clips are."""
        encoded = isinstance(audio, (str, os.PathLike, bytes, bytearray))
        if not encoded:
            if sampling_rate is None:
                raise ValueError("pass the sampling_rate of an audio array")
            if np.ndim(audio) != 1:
                raise ValueError(f"an audio example array must be mono [samples], got shape {np.shape(audio)}")
        wave = decode_audio(audio, self.rate, rate=None if encoded else sampling_rate)
        with self._lock:
            return clip_embeddings(self.model, self.processor, [wave], self.window_samples)

    def search_embeddings(self, queries: np.ndarray, top_k: int = 10) -> list[list[SearchHit]]:
        """The `top_k` sounds for each query embedding [Q, D] (L2-normalised)."""
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        top_k = min(top_k, len(self))
        total = len(self.embeddings)
        return [self._rank(query, top_k, total) for query in queries]

    def _rank(self, query: np.ndarray, top_k: int, total: int) -> list[SearchHit]:
        wanted = min(total, top_k * 8)
        while True:  # widen until top_k distinct sounds are found (at most log4(total / top_k) rounds)
            _, rows = self.vectors.search(query[None], wanted)
            rows = rows[0][rows[0] >= 0]
            candidates = list(dict.fromkeys(self.sound_of_row[rows].tolist()))
            if len(candidates) >= top_k or wanted >= total:
                break
            wanted = min(total, wanted * 4)
        hits = []
        for sound in candidates:
            start, end = self.sound_rows[sound]
            scores = self.embeddings[start:end] @ query
            windows = self.is_window[start:end]
            best_row = start + (int(np.argmax(np.where(windows, scores, -np.inf))) if windows.any() else 0)
            hits.append((float(scores.max()), sound, best_row))
        hits.sort(key=lambda hit: -hit[0])
        return [
            SearchHit(
                rank,
                self.sound_keys[sound],
                self.sound_paths[sound],
                score,
                float(self.starts[row]),
                float(self.ends[row]),
                float(self.durations[row]),
                sound,
            )
            for rank, (score, sound, row) in enumerate(hits[:top_k], 1)
        ]

    def search(self, text: list[str] | str | None = None, audio: list | None = None, top_k: int = 10) -> list[dict]:
        """Ranked sounds for each text query and each example (path / bytes): `[{"query", "results": [hit...]}]`,
        texts first."""
        texts = [text] if isinstance(text, str) else list(text or [])
        examples = list(audio or [])
        if not texts and not examples:
            raise ValueError("no query: give text queries, audio examples, or both")
        embeddings, labels = [], []
        if texts:
            embeddings.append(self.embed_text(texts))
            labels += texts
        for example in examples:
            embeddings.append(self.embed_audio(example))
            labels.append(f"audio:{example}" if isinstance(example, (str, os.PathLike)) else "audio:example")
        results = self.search_embeddings(np.concatenate(embeddings), top_k)
        return [{"query": label, "results": [hit.to_dict() for hit in hits]} for label, hits in zip(labels, results)]

    def window_similarities(self, sound_id: int, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window centre times, cosine similarities) of one sound's windows to a query embedding [D] (its clip
        row when it has no windows)."""
        start, end = self.sound_rows[sound_id]
        rows = np.arange(start, end)
        if self.is_window[rows].any():
            rows = rows[self.is_window[rows]]
        return (self.starts[rows] + self.ends[rows]) / 2, self.embeddings[rows] @ query


__all__ = ["ModelMismatchError", "SearchHit", "SoundIndex"]
