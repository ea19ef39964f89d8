"""Search a sound collection by text or by example: `build_index` embeds it into an index folder (clip and window
CLAP embeddings, Parquet, FAISS), `SoundIndex` searches it, `m2d2_hf.search.app` serves it as a web page.

Needs the `[search]` extra (faiss-cpu; bm25s for hybrid ranking); the web page needs `[app]` (fastapi, uvicorn,
python-multipart).
"""

from .api import ModelMismatchError, SearchHit, SoundIndex
from .building import BuildLockedError, DamagedIndexError, IndexSummary, build_index
from .filters import FilterError
from .sources import SourceItem, list_source
from .vector_index import INDEX_TYPES


__all__ = [
    "INDEX_TYPES",
    "BuildLockedError",
    "DamagedIndexError",
    "FilterError",
    "IndexSummary",
    "ModelMismatchError",
    "SearchHit",
    "SoundIndex",
    "SourceItem",
    "build_index",
    "list_source",
]
