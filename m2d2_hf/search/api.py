"""`SoundIndex`: search an index folder by text or by example, ranking sounds with their best-matching moment.

A query's embedding is compared with every vector (clip and window embeddings) through FAISS; the candidate
sounds are the distinct sounds of the nearest vectors, and each is then scored exactly over all of its own vectors:
its score is its best vector's, its time range the best window's (the whole sound when it has no windows).

A search can also keep only the sounds a metadata filter matches (`where=`, see `filters`: the matching sounds'
rows are handed to FAISS as an ID selector, so the top k are k of them), fuse the dense ranking with BM25 over the
sounds' words (`hybrid=`, see `keywords`), drop near-duplicates of higher-ranked hits (`dedup=`, refilled to k) and
page (`offset=`).
"""

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.audio import decode_audio
from .building import ITEMS_FILE, META_FILE, SOUNDS_FILE, VECTORS_FILE, DamagedIndexError, embeddings_of, open_space
from .embedding import clip_embeddings, load_clap_model, model_fingerprint, text_embeddings
from .filters import matching_rows
from .keywords import KeywordIndex, fused_scores, keyword_ranking
from .vector_index import read_vector_index, restricted_search_params


# The columns every index can filter on, whatever its source held (`SoundIndex.sound_table`).
BUILT_IN_COLUMNS = ("key", "path", "name", "duration")
# Hybrid ranking fuses each query's dense and keyword top HYBRID_DEPTH (or top offset + k when deeper): pages within
# it rank the same sounds the same way; reciprocal-rank fusion barely weighs ranks below it (1/260 against 1/61).
HYBRID_DEPTH = 200
# Guards what an index builds on first use (its sound table, keyword indexes) against the app's threads.
_DERIVED_LOCK = threading.RLock()


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


@dataclass
class _Scope:
    """The sounds a search may return: all of them (`sounds` None) or the sorted ids a filter kept, their number of
    vectors, and the FAISS parameters restricting a search to those vectors."""

    sounds: np.ndarray | None
    rows: int
    params: Any = None


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
        space: the embedding space to search (its key or the start of it; default: the folder's active one). Its
            files are read whole here, so a later change of the folder's active space does not touch this object.

    `space` is the key of the space it searches, `space_folder` that space's files.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        model: str | None = None,
        device: str | torch.device = "cpu",
        space: str | None = None,
    ):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.folder = Path(folder)
        self.space_folder, self.meta = open_space(self.folder, space)
        self.space = self.meta["space"]
        recorded = self.meta["model"]
        # A local model is recorded by its absolute path; a hub id is never one.
        if model is None and os.path.isabs(recorded["name"]) and not os.path.exists(recorded["name"]):
            raise ValueError(
                f"the model folder {recorded['name']} that {self.space_folder / META_FILE} records is gone: pass the "
                "model with --model MODEL_DIR (a copy of it; its config and weights hashes are checked)"
            )
        try:
            table = pq.read_table(self.space_folder / ITEMS_FILE)
        except (pa.ArrowException, OSError) as error:  # the footer read well, the data did not
            raise DamagedIndexError(
                self.folder, f"{self.space_folder / ITEMS_FILE} cannot be read ({error})"
            ) from error
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
            self.vectors = read_vector_index(
                str(self.space_folder / VECTORS_FILE), faiss_info["type"], faiss_info["params"]
            )
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

        path = self.space_folder / ITEMS_FILE
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

    def sound_table(self):
        """One row per sound, in `sound_id` order, with the columns that filters (`where=`) and hybrid ranking read:
        `key`, `path`, `name` (the file name), `duration` (seconds), then the source's metadata columns stored when
        the index was built (split, label, caption, ...: sounds.parquet, which indexes built before it lack)."""
        return self._derived()["table"]

    def _derived(self) -> dict:
        """What is built from the index on first use, for the sounds it holds now."""
        with _DERIVED_LOCK:
            derived = self.__dict__.get("_derived_cache")
            if derived is None or derived["keys"] is not self.sound_keys:
                derived = {"keys": self.sound_keys, "table": self._read_sound_table(), "keywords": {}}
                self._derived_cache = derived
            return derived

    def _read_sound_table(self):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "key": pa.array(self.sound_keys, pa.string()),
                "path": pa.array(self.sound_paths, pa.string()),
                "name": pa.array([Path(path or key).name for key, path in zip(self.sound_keys, self.sound_paths)]),
                "duration": pa.array(self.durations[[start for start, _ in self.sound_rows]], pa.float64()),
            }
        )
        path = self.space_folder / SOUNDS_FILE
        if not self.space_folder.is_dir():
            raise ValueError(f"{self.space_folder} was replaced since this index was opened: open the index again")
        if not path.is_file():
            return table
        try:
            stored = pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise DamagedIndexError(self.folder, f"{path} cannot be read ({error})") from error
        row_of = {key: row for row, key in enumerate(stored.column("key").to_pylist())}
        rows = pa.array([row_of.get(key) for key in self.sound_keys], pa.int64())  # null: a sound it does not list
        for name in stored.column_names:
            if name not in table.column_names:
                table = table.append_column(name, stored.column(name).take(rows))
        return table

    def _scope(self, where: str | None) -> _Scope:
        if where is None:
            return _Scope(None, len(self.embeddings))
        sounds = np.asarray(matching_rows(self.sound_table(), where), dtype=np.int64)
        allowed = np.zeros(len(self), bool)
        allowed[sounds] = True
        rows = np.flatnonzero(allowed[self.sound_of_row])
        faiss_info = self.meta["faiss"]
        params = restricted_search_params(faiss_info["type"], faiss_info["params"], rows) if len(rows) else None
        return _Scope(sounds, len(rows), params)

    def keyword_columns(self) -> list[str]:
        """The text columns hybrid ranking reads words from by default: `name` and the metadata's text columns."""
        import pyarrow as pa

        schema = self.sound_table().schema
        return ["name"] + [
            name
            for name in schema.names
            if name not in BUILT_IN_COLUMNS and pa.types.is_string(schema.field(name).type)
        ]

    def _keywords(self, columns: list[str] | None) -> KeywordIndex:
        table, available = self.sound_table(), ["key", "path"] + self.keyword_columns()
        columns = self.keyword_columns() if columns is None else list(columns)
        wrong = [name for name in columns if name not in available]
        if wrong or not columns:
            raise ValueError(
                f"keyword columns {wrong or columns} are not text columns of this index: choose from "
                f"{', '.join(available)}"
            )
        with _DERIVED_LOCK:
            built = self._derived()["keywords"]
            if tuple(columns) not in built:
                values = zip(*(table.column(name).to_pylist() for name in columns))
                built[tuple(columns)] = KeywordIndex([" ".join(value for value in row if value) for row in values])
            return built[tuple(columns)]

    def search_embeddings(
        self,
        queries: np.ndarray,
        top_k: int = 10,
        *,
        offset: int = 0,
        where: str | None = None,
        dedup: float | None = None,
        keyword_queries: list[str | None] | None = None,
        keyword_columns: list[str] | None = None,
    ) -> list[list[SearchHit]]:
        """
        The `top_k` sounds for each query embedding [Q, D] (L2-normalised), ranked `offset + 1` on.

        Args:
            offset: hits to skip (paging: `offset=k` continues `offset=0` with no overlap).
            where: keep only the sounds this filter matches (`filters`: `label = 'dog' and duration < 5`); the top
                k are then the exact top k of those sounds for the flat index.
            dedup: drop a hit whose best vector has this cosine or more to a higher-ranked hit's (near-duplicate
                files and moments), refilling to `top_k`.
            keyword_queries: one text per query (None: dense only) for hybrid ranking: reciprocal-rank fusion of
                the dense ranking with BM25 over `keyword_columns` (default: `keyword_columns()`).
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}")
        if dedup is not None and not 0 < dedup <= 1:
            raise ValueError(f"dedup is a cosine threshold in (0, 1], e.g. 0.95; got {dedup!r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        keyword_queries = [None] * len(queries) if keyword_queries is None else list(keyword_queries)
        if len(keyword_queries) != len(queries):
            raise ValueError(f"{len(keyword_queries)} keyword queries for {len(queries)} query embeddings")
        if any(keyword_queries):
            self._keywords(keyword_columns)  # checked (and built) once, before any query runs
        scope = self._scope(where)
        return [
            self._page(query, top_k, offset, scope, dedup, text, keyword_columns)
            for query, text in zip(queries, keyword_queries)
        ]

    def _page(
        self,
        query: np.ndarray,
        top_k: int,
        offset: int,
        scope: _Scope,
        dedup: float | None,
        text: str | None,
        columns: list[str] | None,
    ) -> list[SearchHit]:
        needed = offset + top_k
        depth = needed if dedup is None else 2 * needed
        while True:  # deepen until dedup leaves enough hits, or every sound in scope was ranked
            if text:
                ranked = self._fused(query, text, max(HYBRID_DEPTH, depth), scope, columns)
            else:
                ranked = self._ranked(query, depth, scope)
            kept = ranked if dedup is None else self._distinct(ranked, dedup, needed)
            if len(kept) >= needed or len(ranked) < depth:
                break
            depth *= 4
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
            for rank, (score, sound, row) in enumerate(kept[offset:needed], offset + 1)
        ]

    def _scored(self, query: np.ndarray, sound: int) -> tuple[float, int, int]:
        """(score, sound, best row) of one sound: its best vector's score, its best window (else its clip row)."""
        start, end = self.sound_rows[sound]
        scores = self.embeddings[start:end] @ query
        windows = self.is_window[start:end]
        best_row = start + (int(np.argmax(np.where(windows, scores, -np.inf))) if windows.any() else 0)
        return float(scores.max()), int(sound), best_row

    def _ranked(self, query: np.ndarray, count: int, scope: _Scope) -> list[tuple[float, int, int]]:
        """The `count` best sounds of `scope` as (score, sound, best row), best first (ties by sound id). Exact for
        the flat index: the `count` distinct sounds among the nearest vectors hold every sound that beats them."""
        count = min(count, len(self) if scope.sounds is None else len(scope.sounds))
        if count < 1:
            return []
        total = scope.rows
        wanted = min(total, count * 8)
        while True:  # widen until count distinct sounds are found (at most log4(total / count) rounds)
            _, rows = self.vectors.search(query[None], wanted, params=scope.params)
            rows = rows[0][rows[0] >= 0]
            candidates = list(dict.fromkeys(self.sound_of_row[rows].tolist()))
            if len(candidates) >= count or wanted >= total:
                break
            wanted = min(total, wanted * 4)
        if len(candidates) < count:
            # An approximate index can miss allowed vectors (HNSW's walk under a narrow filter): score them all,
            # rather than return fewer than the sounds that match.
            candidates = range(len(self)) if scope.sounds is None else scope.sounds.tolist()
        hits = sorted((self._scored(query, sound) for sound in candidates), key=lambda hit: (-hit[0], hit[1]))
        return hits[:count]

    def _fused(
        self, query: np.ndarray, text: str, depth: int, scope: _Scope, columns: list[str] | None
    ) -> list[tuple[float, int, int]]:
        """The dense top `depth` and the keyword top `depth` of `scope`, fused by reciprocal rank, best first."""
        dense = self._ranked(query, depth, scope)
        candidates = np.arange(len(self)) if scope.sounds is None else scope.sounds
        keyword = keyword_ranking(self._keywords(columns).scores(text), candidates, depth)
        fused = fused_scores([[hit[1] for hit in dense], keyword])
        known = {hit[1]: hit for hit in dense}
        hits = [known.get(sound) or self._scored(query, sound) for sound in fused]
        return sorted(hits, key=lambda hit: (-fused[hit[1]], -hit[0], hit[1]))

    def _distinct(self, ranked: list, threshold: float, needed: int) -> list:
        """The first `needed` of `ranked` whose best vector's cosine to every higher-ranked kept one's is below
        `threshold` (greedy in rank order, so a page of the kept list does not depend on how deep it was asked)."""
        kept, vectors = [], np.empty((needed, self.embeddings.shape[1]), np.float32)
        for hit in ranked:
            vector = self.embeddings[hit[2]]
            if kept and float(np.max(vectors[: len(kept)] @ vector)) >= threshold:
                continue
            vectors[len(kept)] = vector
            kept.append(hit)
            if len(kept) == needed:
                break
        return kept

    def search(
        self,
        text: list[str] | str | None = None,
        audio: list | None = None,
        top_k: int = 10,
        *,
        offset: int = 0,
        where: str | None = None,
        hybrid: bool = False,
        dedup: float | None = None,
        keyword_columns: list[str] | None = None,
    ) -> list[dict]:
        """Ranked sounds for each text query and each example (path / bytes): `[{"query", "results": [hit...]}]`,
        texts first. `offset`, `where`, `dedup` and `keyword_columns` as in `search_embeddings`; `hybrid` fuses the
        text queries' dense ranking with BM25 over the sounds' words (examples stay dense: they have no words)."""
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
        results = self.search_embeddings(
            np.concatenate(embeddings),
            top_k,
            offset=offset,
            where=where,
            dedup=dedup,
            keyword_queries=(texts if hybrid else [None] * len(texts)) + [None] * len(examples),
            keyword_columns=keyword_columns,
        )
        return [{"query": label, "results": [hit.to_dict() for hit in hits]} for label, hits in zip(labels, results)]

    def window_similarities(self, sound_id: int, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(window centre times, cosine similarities) of one sound's windows to a query embedding [D] (its clip
        row when it has no windows)."""
        start, end = self.sound_rows[sound_id]
        rows = np.arange(start, end)
        if self.is_window[rows].any():
            rows = rows[self.is_window[rows]]
        return (self.starts[rows] + self.ends[rows]) / 2, self.embeddings[rows] @ query


__all__ = ["BUILT_IN_COLUMNS", "HYBRID_DEPTH", "ModelMismatchError", "SearchHit", "SoundIndex"]
