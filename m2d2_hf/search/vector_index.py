"""The FAISS index over an index folder's L2-normalised embeddings: inner product = cosine similarity.

`flat` (default) is exact. `ivf` (IndexIVFFlat) and `hnsw` (IndexHNSWFlat) are approximate, for 10^6 vectors and
more; both keep the full float32 vectors (no product quantization: quantized CLIP indexes are known to have silently
degraded text queries), and their recall@10 against the exact search is measured when they are built.
"""

import math

import numpy as np


INDEX_TYPES = ("flat", "ivf", "hnsw")


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
        # About 4 sqrt(N) lists, but at least 39 training vectors per list (FAISS's own minimum).
        nlist = max(1, min(int(4 * math.sqrt(num_vectors)), num_vectors // 39))
        return {"nlist": nlist, "nprobe": min(nlist, 32)}
    if index_type == "hnsw":
        return {"M": 32, "ef_construction": 80, "ef_search": 128}
    raise ValueError(f"unknown index type {index_type!r}: choose one of {INDEX_TYPES}")


def build_vector_index(vectors: np.ndarray, index_type: str = "flat", params: dict | None = None):
    """A FAISS index over `vectors` [N, D] (float32, L2-normalised) searched by inner product."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    params = {**default_params(index_type, len(vectors)), **(params or {})}
    dim = vectors.shape[1]
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "ivf":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
    else:
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["ef_construction"]
    index.add(vectors)
    set_search_params(index, index_type, params)
    return index


def set_search_params(index, index_type: str, params: dict) -> None:
    """Search-time parameters, which FAISS does not keep in the index file for every type."""
    if index_type == "ivf":
        index.nprobe = params["nprobe"]
    elif index_type == "hnsw":
        index.hnsw.efSearch = params["ef_search"]


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
    index = _faiss().read_index(path)
    set_search_params(index, index_type, params)
    return index


__all__ = ["INDEX_TYPES", "build_vector_index", "default_params", "read_vector_index", "recall_at_k"]
