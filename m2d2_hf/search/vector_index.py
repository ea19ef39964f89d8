"""The FAISS index over an index folder's L2-normalised embeddings: inner product = cosine similarity.

`flat` (default) is exact. `ivf` (IndexIVFFlat) and `hnsw` (IndexHNSWFlat) are approximate, for 10^6 vectors and
more; both keep the full float32 vectors (no product quantization: quantized CLIP indexes are known to have silently
degraded text queries), and their recall@10 against the exact search is measured when they are built.
"""

import math
import struct

import numpy as np


INDEX_TYPES = ("flat", "ivf", "hnsw")
# What a FAISS index file starts with, whatever its type: the type's four-letter code, then the dimension (int32) and
# the number of vectors (int64), little-endian (write_index_header in faiss/impl/index_write.cpp). Reading it checks
# an index file against its items without reading the vectors.
_FILE_HEADER = struct.Struct("<4siq")
_TYPE_CODES = {b"IxFI": "flat", b"IwFl": "ivf", b"IHNf": "hnsw"}
# IVF's k-means runs on at most this many vectors per list (FAISS itself would take up to 256).
TRAINING_VECTORS_PER_LIST = 64


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("the search index needs FAISS: pip install 'm2d2_hf[search]' (faiss-cpu)") from error
    return faiss


def default_params(index_type: str, num_vectors: int) -> dict:
    """Build / search parameters of an index type for `num_vectors` vectors."""
    if index_type == "flat":
        return {}
    if index_type == "ivf":
        # sqrt(N) lists (at least 39 training vectors each, FAISS's own minimum): k-means on the training sample
        # costs nlist^2 x 64 x D per iteration, so the 4 sqrt(N) of FAISS's guide would take 16x longer to build
        # (minutes on a few cores at 10^6); nprobe 32 keeps recall@10 near 1 (benchmarks/bench_search.py).
        nlist = max(1, min(int(math.sqrt(num_vectors)), num_vectors // 39))
        return {"nlist": nlist, "nprobe": min(nlist, 32)}
    if index_type == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 128}
    raise ValueError(f"unknown index type {index_type!r}: choose one of {INDEX_TYPES}")


def check_overrides(index_type: str, overrides: dict | None) -> None:
    """Parameter overrides name parameters of `index_type` and are positive integers (checked before embedding)."""
    names = default_params(index_type, 1)
    for name, value in (overrides or {}).items():
        if name not in names:
            known = ", ".join(names) or "none: the exact index has no parameters"
            raise ValueError(f"{index_type} indexes have no parameter {name!r} (they have {known})")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"index parameter {name} must be a positive integer, got {value!r}")


def resolved_params(index_type: str, num_vectors: int, overrides: dict | None = None) -> dict:
    """`default_params` with `overrides` (e.g. `{"nlist": 4000}`), checked, and no more IVF lists than vectors."""
    check_overrides(index_type, overrides)
    params = {**default_params(index_type, num_vectors), **(overrides or {})}
    if index_type == "ivf" and params["nlist"] > num_vectors:
        raise ValueError(f"nlist {params['nlist']} is more IVF lists than the {num_vectors} vectors: lower it")
    return params


def build_vector_index(vectors: np.ndarray, index_type: str = "flat", params: dict | None = None):
    """A FAISS index over `vectors` [N, D] (float32, L2-normalised) searched by inner product."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    params = resolved_params(index_type, len(vectors), params)
    dim = vectors.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(_training_sample(vectors, TRAINING_VECTORS_PER_LIST * params["nlist"]))
    else:
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    index.add(vectors)
    set_search_params(index, index_type, params)
    return index


def _training_sample(vectors: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """A seeded random subset of `size` rows (all rows when there are fewer), so that builds are reproducible."""
    if len(vectors) <= size:
        return vectors
    return vectors[np.sort(np.random.default_rng(seed).choice(len(vectors), size=size, replace=False))]


def set_search_params(index, index_type: str, params: dict) -> None:
    """Search-time parameters, which FAISS does not keep in the index file for every type."""
    if index_type == "ivf":
        index.nprobe = params["nprobe"]
    elif index_type == "hnsw":
        index.hnsw.efSearch = params["ef_search"]


def restricted_search_params(index_type: str, params: dict, rows: np.ndarray):
    """FAISS search parameters that restrict a search to the vectors `rows` (int64 row numbers), the filter pushed
    into the index: FAISS skips the other vectors while it searches, so that k results are k of the allowed rows.
    The index's own search-time parameters go along: FAISS takes a search's parameters whole (an IVF search given
    only a selector probes one list)."""
    faiss = _faiss()
    selector = faiss.IDSelectorBatch(np.ascontiguousarray(rows, dtype=np.int64))
    if index_type == "ivf":
        return faiss.SearchParametersIVF(sel=selector, nprobe=params["nprobe"])
    if index_type == "hnsw":
        return faiss.SearchParametersHNSW(sel=selector, efSearch=params["ef_search"])
    return faiss.SearchParameters(sel=selector)


def recall_at_k(index, vectors: np.ndarray, k: int = 10, num_queries: int = 1000, seed: int = 0) -> float:
    """Mean fraction of the exact top-`k` (inner product) that `index` returns, over `num_queries` of the indexed
    vectors taken as queries."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    k = min(k, len(vectors))
    chosen = np.random.default_rng(seed).choice(len(vectors), size=min(num_queries, len(vectors)), replace=False)
    queries = vectors[np.sort(chosen)]
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    return float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))


def write_vector_index(index, path: str) -> None:
    _faiss().write_index(index, path)


def read_vector_index(path: str, index_type: str, params: dict):
    """The index in the FAISS file `path`; a `ValueError` for a file FAISS cannot read (truncated or damaged)."""
    try:
        index = _faiss().read_index(path)
    except RuntimeError as error:  # FAISS's C++ exceptions: a page of source locations
        raise ValueError(f"{path} cannot be read by FAISS (truncated or damaged)") from error
    set_search_params(index, index_type, params)
    return index


def vector_file_header(path: str) -> tuple[str | None, int, int]:
    """(index type, None for a type this package does not write; dimension; number of vectors) from the first bytes
    of the FAISS file `path`; a `ValueError` for a file too short to be one."""
    with open(path, "rb") as handle:
        header = handle.read(_FILE_HEADER.size)
    if len(header) < _FILE_HEADER.size:
        raise ValueError(f"{path} is {len(header)} bytes long, too short for a FAISS index")
    code, dim, total = _FILE_HEADER.unpack(header)
    return _TYPE_CODES.get(code), dim, total


__all__ = [
    "INDEX_TYPES",
    "build_vector_index",
    "check_overrides",
    "default_params",
    "read_vector_index",
    "recall_at_k",
    "resolved_params",
    "restricted_search_params",
    "vector_file_header",
]
