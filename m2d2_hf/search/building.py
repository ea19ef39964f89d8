"""`build_index`: embed a sound collection into an index folder, resumably, in one or many processes.

Work happens in `.<INDEX_DIR>.partial/` beside the output: every process embeds its share of the sounds still to do
(`items[rank::world]`, one `accelerate` process per GPU or machine, or one plain process) and writes Parquet shards
of a few files each, each shard atomically (temporary name, then rename). A run that is interrupted leaves complete
shards; the next run with the same model and settings skips every sound they hold whose stamp (size and mtime) is
unchanged, and embeds the changed and new ones. When all processes are done, the main process merges the shards
(the newest rows of each sound, only for sounds still in the source), builds the FAISS index, writes the folder
under a temporary name and renames it into place: a space appears whole or not at all. An existing space of the
same model and settings is itself read as a shard, so re-indexing a grown collection embeds only what is new. Sounds
whose stamp changed are hashed first (sha256 of their encoded bytes, `sources.content_hash`): one whose content an
existing space or shard already holds under another key (renamed, moved, copied, or only touched) takes those rows
under its new key instead of being embedded again.

Index folder: one or more embedding spaces, one per model (keyed by `space_key`: its config and weights hashes), of
which one is active; the others are built beside it (`add_space=True`) and switched to with `activate_space`.
    index.json       the manifest: {"format", "format_version": 2, "active": KEY, "spaces": {KEY: {"folder"}}},
                     replaced atomically (temporary file, then rename) whenever a space is added or activated
    README.md        what the folder holds (the active space's facts) and how to search it
    spaces/KEY.ID/   one build of a space, never changed once renamed into place (a rebuild writes a new folder):
        index.json       model fingerprint, settings, counts, FAISS type / parameters / recall@10, failed sounds
        items.parquet    one row per vector: key, stamp, path, kind ("clip" or "window"), start, end, duration,
                         embedding, content_hash; its schema metadata holds the model (name, config and weights
                         hashes) and window / hop / rate
        vectors.faiss    the FAISS index over the embeddings, row i = items row i
        sounds.parquet   one row per sound: its key and the source's other columns (split, label, caption, ...),
                         which filters and hybrid ranking read; absent when the source has none
        README.md        what the space holds
A space folder is deleted only when neither the manifest nor the one it replaced names it, so a reader that read
the manifest just before it changed still finds its space's files. An index of the first format (index.json,
items.parquet and vectors.faiss at the top) is read as one space, and converted on its next build.

`read_index_meta` checks that a folder's files are whole and agree before anything uses them; a build holds a lock in
its `.partial` folder, so that a second build into the same folder stops at once.
"""

import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..data.audio import AudioDecodeError, decode_audio
from ..long_audio import AudioFileSamples
from .embedding import (
    ModelFingerprint,
    clip_embeddings,
    load_clap_model,
    long_file_embeddings,
    model_fingerprint,
    timed_window_embeddings,
)
from .sources import SourceItem, content_hash, list_source, metadata_table
from .vector_index import (
    INDEX_TYPES,
    build_vector_index,
    check_overrides,
    recall_at_k,
    resolved_params,
    vector_file_header,
    write_vector_index,
)


FORMAT = "m2d2-hf-sound-index"
# 1: one space, its files at the top of the folder; 2: a manifest naming the spaces under spaces/ and the active one.
FORMAT_VERSION, SPACE_FORMAT_VERSION = 2, 1
ITEMS_FILE, VECTORS_FILE, META_FILE, README_FILE = "items.parquet", "vectors.faiss", "index.json", "README.md"
# One row per sound: its key and the source's other columns (filters and hybrid ranking read them); beside
# items.parquet, absent from indexes built before it and from sources without metadata.
SOUNDS_FILE = "sounds.parquet"
SETTINGS_FILE, LOCK_FILE, MANIFEST_LOCK_FILE = "settings.json", "build.lock", ".manifest.lock"
SPACES_DIR = "spaces"
PARQUET_MODEL_KEY, PARQUET_SETTINGS_KEY = b"m2d2_hf.model", b"m2d2_hf.settings"
META_COLUMNS = ("key", "stamp", "path", "kind", "start", "end", "duration")
# Absent from indexes and shards written before renames were recognised: read as null (no known content).
HASH_COLUMN = "content_hash"
# Local files longer than this are read a window at a time rather than decoded whole: below it the waveform (38 MB
# for 10 minutes at 16 kHz) is small next to the model, and one read of the whole file is the simplest.
STREAMED_FILE_SECONDS = 600.0
# The index.json entries that searching and re-indexing read, with their types.
_META_TYPES = {
    "model": dict,
    "window_seconds": (int, float),
    "hop_seconds": (int, float),
    "sampling_rate": int,
    "num_files": int,
    "num_vectors": int,
    "dim": int,
    "audio_hours": (int, float),
    "faiss": dict,
    "failed": list,
}


class DamagedIndexError(ValueError):
    """An index folder whose files are missing, unreadable or disagree with one another; `problem` says which."""

    def __init__(self, folder: Path, problem: str):
        super().__init__(
            f"{problem}: the index folder is damaged; rebuild it with `m2d2-hf index MODEL_DIR SOURCE --output "
            f"{folder}` (which replaces it)"
        )
        self.problem = problem


class DamagedShardError(ValueError):
    """A shard or failure list of an interrupted build that cannot be read; `problem` says which."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}: delete it and run again (its sounds are embedded again)")
        self.problem = problem


class BuildLockedError(OSError):
    """Another build is writing the same index folder."""


@dataclass
class IndexSummary:
    """What a `build_index` run did (in the main process; the counts cover all processes)."""

    output: Path
    num_files: int
    num_vectors: int
    audio_seconds: float
    embedded_files: int
    reused_files: int
    failed: list[dict] = field(default_factory=list)
    # Sounds whose stamp changed but whose content the index already held (renamed, moved, copied or touched): their
    # rows were reused under the new key, not embedded again (they are not in `embedded_files`).
    moved_files: int = 0
    space: str = ""
    seconds: float = 0.0
    recall_at_10: float | None = None


def _schema(dim: int):
    import pyarrow as pa

    # The schema as a table: field, type (fmt: skip keeps the rows).
    return pa.schema(
        [("key", pa.string()), ("stamp", pa.string()), ("path", pa.string()), ("kind", pa.string()),
         ("start", pa.float64()), ("end", pa.float64()), ("duration", pa.float64()),
         ("embedding", pa.list_(pa.float32(), dim)), (HASH_COLUMN, pa.string())]
    )  # fmt: skip


def _with_hash_column(table):
    """`table` with a null `content_hash` column when it has none (written before hashes were recorded)."""
    import pyarrow as pa

    if HASH_COLUMN in table.column_names:
        return table
    return table.append_column(HASH_COLUMN, pa.nulls(len(table), pa.string()))


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    write(str(temporary))
    os.replace(temporary, path)


def _write_shard(folder: Path, name: str, table, failed: list[dict]) -> None:
    import pyarrow.parquet as pq

    text = json.dumps(failed)
    # The failure list first: a shard counts as done once its Parquet file exists.
    _atomic_write(folder / f"{name}.failed.json", lambda p: Path(p).write_text(text))
    _atomic_write(folder / f"{name}.parquet", lambda p: pq.write_table(table, p))


def _shard_name(suffix: str) -> str:
    # Time-ordered names: when shards disagree about a sound, the newest wins at the merge.
    return f"{time.time_ns():020d}-{suffix}"


class _ShardWriter:
    """Rows and failures of the sounds one process embeds, written every `files_per_shard` sounds; `hashes` gives
    each sound's content hash."""

    def __init__(self, folder: Path, rank: int, dim: int, files_per_shard: int, hashes: dict[str, str | None]):
        self.folder, self.rank, self.dim, self.files_per_shard = folder, rank, dim, files_per_shard
        self.hashes = hashes
        self.rows: list[dict] = []
        self.failed: list[dict] = []
        self.files = 0

    def add(
        self,
        item: SourceItem,
        kinds_starts_ends: list[tuple[str, float, float]],
        duration: float,
        embeddings: np.ndarray,
    ) -> None:
        for (kind, start, end), embedding in zip(kinds_starts_ends, embeddings):
            self.rows.append(
                {
                    "key": item.key,
                    "stamp": item.stamp,
                    "path": item.path,
                    "kind": kind,
                    "start": start,
                    "end": end,
                    "duration": duration,
                    "embedding": embedding,
                    HASH_COLUMN: self.hashes.get(item.key),
                }
            )
        self._count()

    def fail(self, item: SourceItem, error: str) -> None:
        self.failed.append({"key": item.key, "stamp": item.stamp, "error": error})
        self._count()

    def _count(self) -> None:
        self.files += 1
        if self.files >= self.files_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.files:
            return
        import pyarrow as pa

        table = pa.Table.from_pylist(self.rows, schema=_schema(self.dim))
        _write_shard(self.folder, _shard_name(f"r{self.rank:04d}"), table, self.failed)
        self.rows, self.failed, self.files = [], [], 0


def _shard_files(folder: Path, previous_index: Path | None) -> list[Path]:
    """Parquet shards oldest first; a previous complete index counts as the oldest."""
    shards = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if previous_index is not None:
        shards.insert(0, previous_index / ITEMS_FILE)
    return shards


def _read_json(path: Path) -> Any:
    """The JSON in `path`; a ValueError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not readable JSON ({error})") from error


def _is_failure_list(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(failure, dict) and {"key", "stamp", "error"} <= failure.keys() for failure in value
    )


def _sidecar_of(shard: Path) -> Path:
    return shard.with_name(shard.name[: -len(".parquet")] + ".failed.json")


def _failures_of(shard: Path) -> list[dict]:
    if shard.name == ITEMS_FILE:  # a previous index, checked by `read_index_meta`
        return json.loads((shard.parent / META_FILE).read_text())["failed"]
    sidecar = _sidecar_of(shard)
    if not sidecar.is_file():
        return []
    try:
        failures = _read_json(sidecar)
    except ValueError as error:
        raise DamagedShardError(str(error)) from error
    if not _is_failure_list(failures):
        raise DamagedShardError(f"{sidecar} is not a list of failed sounds")
    return failures


def _read_shard(shard: Path, columns: list[str] | None = None, schema_only: bool = False) -> Any:
    """The table (or only the schema, read from the footer) of a Parquet shard; `DamagedShardError` when it cannot
    be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(shard) if schema_only else pq.read_table(shard, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise DamagedShardError(f"{shard} cannot be read ({error})") from error


def _drop_unreadable(work: Path, dim: int, say: Callable[[str], None]) -> None:
    """Deletes the shards and failure lists in `work` that cannot be read (a disk error, a stray file), saying so:
    their sounds are embedded again, as they would have to be to resume from them. Only the footer of each shard is
    read here; a shard damaged inside fails later with its name and what to delete."""
    expected = [column for column in _schema(dim) if column.name != HASH_COLUMN]
    for shard in sorted(work.glob("*.parquet")):
        sidecar = _sidecar_of(shard)
        try:
            schema = _read_shard(shard, schema_only=True)
            wrong = [f.name for f in expected if f.name not in schema.names or schema.field(f.name).type != f.type]
            if wrong:
                raise DamagedShardError(f"{shard} is not a shard of this build (columns {wrong} missing or mistyped)")
        except DamagedShardError as error:
            shard.unlink()
            sidecar.unlink(missing_ok=True)
            say(f"{error.problem}: deleted it and its failure list; its sounds are embedded again")
            continue
        try:
            _failures_of(shard)
        except DamagedShardError as error:
            sidecar.unlink()
            say(f"{error.problem}: deleted it; the sounds that had failed in its shard are tried again")


def _done(shards: list[Path]) -> tuple[dict[str, str], dict[str, tuple[Path, str]]]:
    """key → stamp of every sound embedded or failed in `shards` (newest shard wins), and content hash → (shard,
    key) of the embedded sounds whose content is known: a sound's rows in a shard are the embeddings of that
    content whatever became of its file since."""
    done: dict[str, str] = {}
    by_hash: dict[str, tuple[Path, str]] = {}
    for shard in shards:
        hashed = HASH_COLUMN in _read_shard(shard, schema_only=True).names
        table = _read_shard(shard, columns=["key", "stamp"] + ([HASH_COLUMN] if hashed else []))
        keys = table.column("key").to_pylist()
        done.update(zip(keys, table.column("stamp").to_pylist()))
        if hashed:
            by_hash.update((digest, (shard, key)) for key, digest in zip(keys, table.column(HASH_COLUMN).to_pylist()))
        done.update((failure["key"], failure["stamp"]) for failure in _failures_of(shard))
    by_hash.pop(None, None)
    return done, by_hash


def _reuse_moved(work: Path, todo: list[SourceItem], hashes: dict, by_hash: dict, dim: int) -> None:
    """Writes one shard holding, for each sound of `todo` whose content `by_hash` knows, the rows of that content
    under the sound's own key, stamp and path. An interrupted run leaves the shard whole or not at all, like the
    embedded ones."""
    import pyarrow as pa

    moved = {item.key: by_hash[hashes[item.key]] for item in todo if hashes.get(item.key) in by_hash}
    if not moved:
        return
    items = {item.key: item for item in todo}
    wanted: dict[Path, list[tuple[SourceItem, str]]] = {}
    for key, (shard, source_key) in moved.items():
        wanted.setdefault(shard, []).append((items[key], source_key))
    pieces = []
    for shard, pairs in wanted.items():
        table = _read_shard(shard)
        rows_of: dict[str, list[int]] = {}
        for row, key in enumerate(table.column("key").to_pylist()):
            rows_of.setdefault(key, []).append(row)
        for item, source_key in pairs:
            taken = table.take(pa.array(rows_of[source_key], pa.int64()))
            count = len(taken)
            columns = {"key": item.key, "stamp": item.stamp, "path": item.path, HASH_COLUMN: hashes[item.key]}
            pieces.append(
                pa.table(
                    {
                        name: pa.array([columns[name]] * count, pa.string()) if name in columns else taken[name]
                        for name in _schema(dim).names
                    },
                    schema=_schema(dim),
                )
            )
    _write_shard(work, _shard_name("moved"), pa.concat_tables(pieces), [])


def _merge(shards: list[Path], items: list[SourceItem]) -> tuple[Any, list[dict]]:
    """The rows of the current sounds (each from the newest shard holding it with its current stamp) in source
    order, and the current failures."""
    import pyarrow as pa
    import pyarrow.compute as pc

    current = {item.key: item.stamp for item in items}
    order = {item.key: position for position, item in enumerate(items)}
    newest: dict[str, int] = {}
    failed: dict[str, dict] = {}
    tables = []
    for number, shard in enumerate(shards):
        table = _with_hash_column(_read_shard(shard))
        keys, stamps = table.column("key").to_pylist(), table.column("stamp").to_pylist()
        for key, stamp in zip(keys, stamps):
            if current.get(key) == stamp:
                newest[key] = number
                failed.pop(key, None)
        for failure in _failures_of(shard):
            if current.get(failure["key"]) == failure["stamp"]:
                failed[failure["key"]] = failure
                newest.pop(failure["key"], None)
        tables.append(table.append_column("shard", pa.array(np.full(len(table), number, dtype=np.int64))))
    table = pa.concat_tables(tables) if tables else pa.Table.from_pylist([], schema=_schema(1))
    keys = table.column("key").to_pylist()
    shard_of = table.column("shard").to_numpy()
    keep = np.fromiter((newest.get(key, -1) == number for key, number in zip(keys, shard_of)), bool, len(keys))
    table = table.filter(pa.array(keep)).drop_columns(["shard"])
    position = pa.array([order[key] for key in table.column("key").to_pylist()], pa.int64())
    kind_rank = pc.if_else(pc.equal(table.column("kind"), "clip"), 0, 1)
    table = table.append_column("_order", position).append_column("_kind", kind_rank)
    table = table.sort_by([("_order", "ascending"), ("_kind", "ascending"), ("start", "ascending")])
    failures = sorted(failed.values(), key=lambda failure: order[failure["key"]])
    table = table.drop_columns(["_order", "_kind"])
    # Sounds kept from an index written before hashes were recorded get theirs now (one read of each, once), so that
    # their renames are recognised from the next run on.
    digests = table.column(HASH_COLUMN).to_pylist()
    unknown = {key for key, digest in zip(table.column("key").to_pylist(), digests) if digest is None}
    if unknown:
        found = {item.key: content_hash(item.audio_value()) for item in items if item.key in unknown}
        digests = [found.get(key, digest) for key, digest in zip(table.column("key").to_pylist(), digests)]
        table = table.set_column(table.column_names.index(HASH_COLUMN), HASH_COLUMN, pa.array(digests, pa.string()))
    return table, failures


def embeddings_of(table) -> np.ndarray:
    """The `embedding` column of an items table as a float32 [rows, D] array."""
    column = table.column("embedding").combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)
    return values.reshape(len(column), column.type.list_size).astype(np.float32, copy=False)


def space_key(model: dict) -> str:
    """The key of a model's embedding space: its config and weights hashes (not its name: a model folder moved
    elsewhere computes the same embeddings)."""
    return f"{model['config_hash']}-{model['weights_hash']}"


def _index_json(folder: Path, space_folder: Path | None = None) -> dict:
    """The parsed `index.json` of an index folder (or of its space in `space_folder`): a ValueError when it is of
    another format or the index folder has none, `DamagedIndexError` when it cannot be read or a space's is gone."""
    meta_path = (space_folder or folder) / META_FILE
    if space_folder is not None and not meta_path.is_file():
        raise DamagedIndexError(folder, f"{meta_path} is missing ({folder / META_FILE} names its space)")
    if not meta_path.is_file():
        raise ValueError(f"{folder} is not a search index (no {META_FILE}): build one with `m2d2-hf index`")
    try:
        meta = _read_json(meta_path)
    except ValueError as error:
        raise DamagedIndexError(folder, str(error)) from error
    if not isinstance(meta, dict):
        raise DamagedIndexError(folder, f"{meta_path} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not an m2d2-hf search index (format {meta.get('format')!r})")
    return meta


def read_manifest(folder: str | os.PathLike) -> dict:
    """`{"format_version", "active": KEY, "spaces": {KEY: space folder}}` of an index folder, its entries checked
    (not the spaces' files: `open_space` checks those). A folder of the first format is one space, its own folder."""
    folder = Path(folder)
    meta = _index_json(folder)
    if "spaces" not in meta:
        model = meta.get("model")
        valid = isinstance(model, dict) and all(isinstance(model.get(k), str) for k in ("config_hash", "weights_hash"))
        key = space_key(model) if valid else "unknown"  # its own checks then name what is missing
        return {"format_version": 1, "active": key, "spaces": {key: folder}}
    spaces, active, wrong = meta["spaces"], meta.get("active"), []

    def inside(entry: Any) -> bool:  # spaces/NAME, nothing that leads out of the folder
        name = entry.get("folder") if isinstance(entry, dict) else None
        parts = Path(name).parts if isinstance(name, str) else ()
        return len(parts) == 2 and parts[0] == SPACES_DIR and not parts[1].startswith(".")

    if not isinstance(spaces, dict) or not spaces or not all(inside(entry) for entry in spaces.values()):
        wrong.append("spaces")
    elif not isinstance(active, str) or active not in spaces:
        wrong.append("active")
    if wrong:
        raise DamagedIndexError(folder, f"{folder / META_FILE} has missing or invalid entries: {', '.join(wrong)}")
    return {
        "format_version": 2,
        "active": active,
        "spaces": {key: folder / entry["folder"] for key, entry in spaces.items()},
    }


def find_space(folder: str | os.PathLike, manifest: dict, space: str) -> str:
    """The key of the space `space` names: its key, or the start of exactly one key."""
    found = [key for key in manifest["spaces"] if key == space] or [
        key for key in manifest["spaces"] if key.startswith(space)
    ]
    if len(found) != 1:
        which = "matches several spaces" if found else "is not a space of it"
        raise ValueError(
            f"{space!r} {which} in {folder}: give one of {', '.join(manifest['spaces'])} (listed by `m2d2-hf "
            f"index-space {folder}`)"
        )
    return found[0]


def open_space(folder: str | os.PathLike, space: str | None = None) -> tuple[Path, dict]:
    """(the folder of the space `space` of the index folder `folder` (default: the active one), its checked
    `index.json` entries plus `space`: its key); see `read_index_meta`."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    key = manifest["active"] if space is None else find_space(folder, manifest, space)
    meta = _check_space(folder, manifest["spaces"][key])
    meta["space"] = key
    return manifest["spaces"][key], meta


def read_index_meta(folder: str | os.PathLike, space: str | None = None) -> dict:
    """The `index.json` entries of a space (default: the active one) of the index folder `folder`, once cheap
    checks (no vector is read) found its files there and agreeing: its entries, the FAISS file's header and the
    Parquet footer against the recorded type, number of vectors and dimension; `space` is its key. Raises
    `DamagedIndexError` naming the file at fault; a plain ValueError for a folder with no index.json or one of
    another format."""
    return open_space(folder, space)[1]


def _check_space(folder: Path, space_folder: Path) -> dict:
    """The checked `index.json` of the space in `space_folder` of the index folder `folder` (see `read_index_meta`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta_path, items_path, vectors_path = (space_folder / name for name in (META_FILE, ITEMS_FILE, VECTORS_FILE))
    meta = _index_json(folder, space_folder)
    wrong = [name for name, kind in _META_TYPES.items() if not isinstance(meta.get(name), kind)]
    model, faiss_info = meta.get("model"), meta.get("faiss")
    if isinstance(model, dict):
        wrong += [
            f"model.{key}" for key in ("name", "config_hash", "weights_hash") if not isinstance(model.get(key), str)
        ]
    if isinstance(faiss_info, dict):
        wrong += ["faiss.type"] if faiss_info.get("type") not in INDEX_TYPES else []
        wrong += ["faiss.params"] if not isinstance(faiss_info.get("params"), dict) else []
    if "failed" not in wrong and not _is_failure_list(meta["failed"]):
        wrong.append("failed")
    if wrong:
        raise DamagedIndexError(folder, f"{meta_path} has missing or invalid entries: {', '.join(wrong)}")
    for path in (vectors_path, items_path):
        if not path.is_file():
            raise DamagedIndexError(folder, f"{path} is missing")
    try:
        index_type, dim, total = vector_file_header(str(vectors_path))
    except (OSError, ValueError) as error:
        raise DamagedIndexError(folder, str(error)) from error
    if index_type != faiss_info["type"]:
        raise DamagedIndexError(
            folder, f"{vectors_path} is not the FAISS {faiss_info['type']} index {META_FILE} records"
        )
    try:
        footer = pq.read_metadata(items_path)
        rows, schema = footer.num_rows, footer.schema.to_arrow_schema()
    except (pa.ArrowException, OSError) as error:
        raise DamagedIndexError(folder, f"{items_path} is not a readable Parquet file ({error})") from error
    missing = [
        name for name in ("key", "path", "kind", "start", "end", "duration", "embedding") if name not in schema.names
    ]
    if missing:
        raise DamagedIndexError(folder, f"{items_path} has no columns {', '.join(missing)}")
    width = getattr(schema.field("embedding").type, "list_size", None)
    if not rows == total == meta["num_vectors"]:
        raise DamagedIndexError(
            folder,
            f"{vectors_path} holds {total} vectors but {items_path} has {rows} rows and {META_FILE} records "
            f"{meta['num_vectors']} (one row per vector)",
        )
    if not dim == width == meta["dim"]:
        raise DamagedIndexError(
            folder,
            f"{vectors_path} holds {dim}-d vectors but {items_path} {width}-d embeddings and {META_FILE} records "
            f"{meta['dim']}-d",
        )
    return meta


def _readme(meta: dict) -> str:
    model, faiss_info = meta["model"], meta["faiss"]
    recall = faiss_info.get("recall_at_10")
    recall_line = "exact search (recall 1.0)" if recall is None else f"recall@10 against exact search: {recall:.4f}"
    failed = meta["failed"]
    failed_lines = "\n".join(f"- `{f['key']}`: {f['error']}" for f in failed[:50]) or "none"
    if len(failed) > 50:
        failed_lines += f"\n- ... and {len(failed) - 50} more (see index.json)"
    return f"""---
tags:
- m2d2-hf
- audio-retrieval
- faiss
---

# Sound search index

A text-to-audio and audio-to-audio search index of {meta["num_files"]} sounds ({meta["audio_hours"]:.3f} hours),
built by `m2d2-hf index` with the M2D2 CLAP model `{model["name"]}`.

## Contents

- `items.parquet`: {meta["num_vectors"]} rows, one per vector: the sound (`key`, `path`, `stamp` = size:mtime),
  `kind` (`clip`: the whole sound; `window`: {meta["window_seconds"]:g} s windows every {meta["hop_seconds"]:g} s,
  for sounds longer than one window), `start` / `end` / `duration` in seconds, and the L2-normalised
  {meta["dim"]}-d CLAP audio `embedding`.
- `vectors.faiss`: a FAISS `{faiss_info["type"]}` index over the embeddings (inner product = cosine),
  parameters {json.dumps(faiss_info["params"])}; {recall_line}.
- `index.json`: the same facts for programs.

## Model

- name: `{model["name"]}`
- config hash: `{model["config_hash"]}`, weights hash: `{model["weights_hash"]}`

Queries must be embedded by this model: searching with another one is refused.

## Use

```bash
m2d2-hf search INDEX_DIR "a dog barks" --top-k 10
m2d2-hf search INDEX_DIR --audio example.wav
m2d2-hf serve INDEX_DIR --port 7860
```

## Sounds that could not be decoded ({len(failed)})

{failed_lines}
"""


def _space_readme(meta: dict, spaces: dict[str, dict], active: str) -> str:
    """The index folder's README: its active space's, then every space with its model."""
    lines = [
        f"- `{key}`{' (active)' if key == active else ''}: model `{entry['model']['name']}`, {entry['num_files']} "
        f"sounds, in `{entry['folder']}/`"
        for key, entry in spaces.items()
    ]
    return (
        _readme(meta)
        + f"""
## Embedding spaces ({len(spaces)})

One per model; queries use the active one. Switch with `m2d2-hf index-space INDEX_DIR --activate KEY` (and a running
`m2d2-hf serve` with `POST /api/space`).

"""
        + "\n".join(lines)
        + "\n"
    )


@contextmanager
def _manifest_lock(output: Path) -> Iterator[None]:
    """Held while the manifest is read, changed and replaced, so that a build adding a space and an activation
    running at once both keep their change."""
    with open(output / MANIFEST_LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _write_manifest(output: Path, change: Callable[[dict], None]) -> dict:
    """Applies `change` to the manifest of the index folder `output` (a format-2 one) and replaces it atomically,
    with the README; then deletes the space folders that neither the new manifest nor the one it replaced names (a
    reader that read the old one a moment ago still finds its space). Returns the new manifest."""
    with _manifest_lock(output):
        old = _index_json(output)
        new = json.loads(json.dumps(old))
        change(new)
        spaces, active = new["spaces"], new["active"]
        active_meta = _read_json(output / spaces[active]["folder"] / META_FILE)
        _atomic_write(output / META_FILE, lambda p: Path(p).write_text(json.dumps(new, indent=2)))
        _atomic_write(output / README_FILE, lambda p: Path(p).write_text(_space_readme(active_meta, spaces, active)))
        named = {Path(entry["folder"]).name for manifest in (old, new) for entry in manifest["spaces"].values()}
    for folder in (output / SPACES_DIR).iterdir():
        if folder.name not in named:
            shutil.rmtree(folder, ignore_errors=True)
    return new


def _manifest_entry(meta: dict, folder_name: str) -> dict:
    return {"folder": f"{SPACES_DIR}/{folder_name}", "model": meta["model"], "num_files": meta["num_files"]}


def _write_index(
    output: Path,
    table,
    failures: list[dict],
    meta: dict,
    index_type: str,
    params: dict | None,
    manifest: dict | None,
    add_space: bool,
    sounds=None,
) -> float | None:
    """Writes the space of `meta`'s model into the index folder `output`, whose `manifest` (`read_manifest`; None
    when there is no readable one) was read at the start of the build. Into a format-2 index: a new space folder,
    then the manifest naming it (the space keeps being active or not; a model new to the index is added beside the
    others with `add_space`, else replaces them and becomes active). Otherwise the whole folder is written under a
    temporary name and renamed into place, the space of a first-format index kept beside the new one with
    `add_space`."""
    import pyarrow.parquet as pq

    vectors = embeddings_of(table)
    params = resolved_params(index_type, len(vectors), params)
    index = build_vector_index(vectors, index_type, params)
    recall = None if index_type == "flat" else recall_at_k(index, vectors)
    durations = dict(zip(table.column("key").to_pylist(), table.column("duration").to_pylist()))
    meta.update(
        num_files=len(durations),
        num_vectors=len(vectors),
        dim=int(vectors.shape[1]),
        audio_hours=sum(durations.values()) / 3600,
        faiss={"type": index_type, "params": params, "recall_at_10": recall},
        failed=[{"key": f["key"], "stamp": f["stamp"], "error": f["error"]} for f in failures],
    )
    key = space_key(meta["model"])
    name = f"{key}.{uuid.uuid4().hex[:12]}"

    def write_space(spaces: Path) -> None:
        temporary = spaces / f".{name}.tmp"
        temporary.mkdir(parents=True)
        try:
            # The Parquet file names its model too, so that it stays identifiable when copied out of the folder.
            described = table.replace_schema_metadata(
                {
                    PARQUET_MODEL_KEY: json.dumps(meta["model"]),
                    PARQUET_SETTINGS_KEY: json.dumps(_window_settings(meta)),
                }
            )
            pq.write_table(described, temporary / ITEMS_FILE)
            if sounds is not None:
                pq.write_table(sounds, temporary / SOUNDS_FILE)
            write_vector_index(index, str(temporary / VECTORS_FILE))
            (temporary / META_FILE).write_text(json.dumps(meta, indent=2))
            (temporary / README_FILE).write_text(_readme(meta))
            os.replace(temporary, spaces / name)
        finally:
            if temporary.exists():
                shutil.rmtree(temporary)

    if manifest is not None and manifest["format_version"] == 2:
        write_space(output / SPACES_DIR)

        def add(manifest: dict) -> None:
            if key not in manifest["spaces"] and not add_space:
                manifest["spaces"], manifest["active"] = {}, key
            manifest["spaces"][key] = _manifest_entry(meta, name)

        _write_manifest(output, add)
        return recall

    temporary = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    try:
        write_space(temporary / SPACES_DIR)
        spaces, active = {key: _manifest_entry(meta, name)}, key
        if add_space and manifest is not None and manifest["active"] != key:
            # A first-format index: its files become its space's folder (hard links: no copy, no change to them).
            legacy, legacy_meta = open_space(output)
            legacy_name = f"{manifest['active']}.{uuid.uuid4().hex[:12]}"
            (temporary / SPACES_DIR / legacy_name).mkdir()
            for file in (ITEMS_FILE, VECTORS_FILE, META_FILE, README_FILE):
                if (legacy / file).is_file():
                    _link_or_copy(legacy / file, temporary / SPACES_DIR / legacy_name / file)
            legacy_meta.pop("space")
            spaces[manifest["active"]], active = _manifest_entry(legacy_meta, legacy_name), manifest["active"]
        manifest_text = json.dumps(
            {"format": FORMAT, "format_version": FORMAT_VERSION, "active": active, "spaces": spaces}, indent=2
        )
        (temporary / META_FILE).write_text(manifest_text)
        active_meta = meta if active == key else _read_json(temporary / spaces[active]["folder"] / META_FILE)
        (temporary / README_FILE).write_text(_space_readme(active_meta, spaces, active))
        if output.exists():
            retired = output.with_name(f".{output.name}.{uuid.uuid4().hex}.old")
            os.replace(output, retired)
            os.replace(temporary, output)
            shutil.rmtree(retired)
        else:
            os.replace(temporary, output)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return recall


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def activate_space(folder: str | os.PathLike, space: str) -> str:
    """Makes the space `space` (its key or the start of it) the active one of the index folder `folder`, once its
    files were checked, by replacing the manifest atomically; returns its key. A first-format index has one space,
    active already. Readers that opened the index before keep their space; a running `serve` switches on
    `POST /api/space`."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    key = find_space(folder, manifest, space)
    _check_space(folder, manifest["spaces"][key])
    if manifest["format_version"] == 2:
        _write_manifest(folder, lambda manifest: manifest.update(active=key))
    return key


def remove_space(folder: str | os.PathLike, space: str) -> str:
    """Drops the space `space` (not the active one) from the manifest of the index folder `folder`; its folder is
    deleted at the next change of the manifest (a reader may be reading it). Returns its key."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    key = find_space(folder, manifest, space)
    if key == manifest["active"]:
        raise ValueError(f"{key} is the active space of {folder}: activate another one first (`--activate KEY`)")
    _write_manifest(folder, lambda manifest: manifest["spaces"].pop(key))
    return key


def list_spaces(folder: str | os.PathLike) -> list[dict]:
    """Each space of the index folder `folder`: `{"space", "active", "folder", and its index.json entries}`, the
    active one first, each checked as `read_index_meta` checks it."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    spaces = sorted(manifest["spaces"].items(), key=lambda pair: pair[0] != manifest["active"])
    return [
        {"space": key, "active": key == manifest["active"], "folder": str(path), **_check_space(folder, path)}
        for key, path in spaces
    ]


def _is_long_file(value: Any) -> bool:
    """Whether `value` is a local file soundfile reads that is longer than `STREAMED_FILE_SECONDS`: such a file is
    embedded straight from disk a window at a time (bounded memory for hours-long files) instead of decoded whole;
    everything else (shorter files, bytes, formats only torchcodec reads) goes through `decode_audio`."""
    if not isinstance(value, str) or not os.path.isfile(value):
        return False
    import soundfile as sf

    try:
        info = sf.info(value)
    except (RuntimeError, OSError):  # not for soundfile: `decode_audio` tries torchcodec, or says why it failed
        return False
    return info.frames > STREAMED_FILE_SECONDS * info.samplerate


def _window_settings(meta: dict) -> dict:
    return {key: meta[key] for key in ("window_seconds", "hop_seconds", "sampling_rate")}


def _settings(fingerprint: ModelFingerprint, window_seconds: float, hop_seconds: float, rate: int) -> dict:
    return {
        "model": fingerprint.to_dict(),
        "window_seconds": window_seconds,
        "hop_seconds": hop_seconds,
        "sampling_rate": rate,
    }


def _same_settings(meta: dict, settings: dict) -> bool:
    """Same model hashes (wherever the model now lies), window, hop and sampling rate."""

    def hashes(model: dict | None) -> tuple:
        return (model or {}).get("config_hash"), (model or {}).get("weights_hash")

    return hashes(meta.get("model")) == hashes(settings["model"]) and all(
        meta.get(key) == value for key, value in settings.items() if key != "model"
    )


def _previous_space(output: Path, settings: dict, say: Callable[[str], None]) -> tuple[dict | None, Path | None]:
    """(the manifest of the index folder `output`, None when there is none or it is damaged; the folder of its space
    of the model and settings of this build, None when there is none or it is damaged)."""
    if not (output / META_FILE).is_file():
        return None, None
    try:
        manifest = read_manifest(output)
    except DamagedIndexError as error:
        say(f"{error.problem}: embedding every sound again; the new index replaces the damaged one")
        return None, None
    key = space_key(settings["model"])
    if key not in manifest["spaces"]:
        return manifest, None
    try:
        folder, meta = open_space(output, key)
    except DamagedIndexError as error:
        say(f"{error.problem}: embedding every sound again; the new space replaces the damaged one")
        return manifest, None
    return manifest, folder if _same_settings(meta, settings) else None


def _recorded_settings(work: Path, say: Callable[[str], None]) -> dict | None:
    """The settings of the interrupted run in `work`: None when there is none, or when its record cannot be read but
    no shard depends on it (the record is then written again)."""
    path = work / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        recorded = _read_json(path)
        if isinstance(recorded, dict):
            return recorded
        problem = f"{path} holds a JSON {type(recorded).__name__}, not settings"
    except ValueError as error:
        problem = str(error)
    shards = len(list(work.glob("*.parquet")))
    if shards:
        raise ValueError(
            f"{problem}, so whether the {shards} shards beside it were embedded with this model and settings is "
            f"unknown: delete {work} to start over"
        )
    say(f"{problem}: writing it again (no shard depends on it)")
    return None


def _lock_file(work: Path, output: Path):
    """The open lock file in `work`, flocked by this process and holding its pid; `BuildLockedError` at once when
    another process holds it."""
    import fcntl

    path = work / LOCK_FILE
    while True:
        work.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(path, "a+")
        except FileNotFoundError:  # a build finishing meanwhile removed the folder: make it again
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            handle.close()
            raise BuildLockedError(
                f"another m2d2-hf index is building {output} (pid {pid}); wait for it or choose another --output"
            ) from None
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        handle.close()  # a build finishing meanwhile deleted the file this one locked: lock the new one
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@contextmanager
def _build_lock(work: Path, output: Path, state) -> Iterator[None]:
    """Held by the main process for a whole build, so that a second build into the same folder stops at once rather
    than resume from the shards the first is writing (and lose them when the first deletes `work`). An flock: released
    when the build ends however it ends, and by the system when its process dies, so a crashed build leaves no stale
    lock. The other processes of an `accelerate` run share their main process's lock and stop with it."""
    handle, refusal = None, [None]
    if state.is_main_process:
        try:
            handle = _lock_file(work, output)
        except BuildLockedError as error:
            refusal = [str(error)]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise BuildLockedError(refusal[0])
    try:
        yield
    finally:
        if handle is not None:
            # A build that stopped before writing anything leaves no folder behind.
            if work.is_dir() and [path.name for path in work.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(work)
            handle.close()


def _decode_for_embedding(value: Any, rate: int, max_peak: float) -> np.ndarray:
    """`decode_audio`, with audio too loud for the model's float32 spectra (a float file of 1e30 samples decodes,
    but its features would be Inf) as an `AudioDecodeError` too: it is skipped and listed like an undecodable file,
    instead of failing the batch it is in at every run."""
    wave = decode_audio(value, sampling_rate=rate, max_seconds=None)
    peak = float(np.max(np.abs(wave)))
    if peak > max_peak:
        raise AudioDecodeError(
            f"peaks at {peak:g}, too loud for float32 spectra (above {max_peak:.3g}): audio is expected in [-1, 1]"
        )
    return wave


def build_index(
    model_name: str,
    source: Any,
    output: str | os.PathLike,
    window_seconds: float = 2.0,
    hop_seconds: float = 1.0,
    index_type: str = "flat",
    index_params: dict | None = None,
    batch_size: int = 8,
    files_per_shard: int = 64,
    split: str | None = None,
    audio_column: str = "audio",
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    add_space: bool = False,
    update: bool = False,
) -> IndexSummary | None:
    """
    Embeds `source` (see `m2d2_hf.search.sources`) with the M2D2 CLAP model `model_name` into the index folder
    `output` (see the module docstring). Under `accelerate launch` every process embeds its share; the main process
    merges and returns the summary, the others return None.

    Args:
        window_seconds / hop_seconds: the window embeddings of sounds longer than one window, as the timeline's.
        index_type: `"flat"` (exact), `"ivf"` or `"hnsw"`; `index_params` override `default_params`.
        batch_size: short sounds per forward pass, and windows per forward pass.
        files_per_shard: sounds per resumable shard.
        log: where progress lines go (default: stderr of the main process).
        add_space: when `output` is an index of other models, add this model's space beside theirs (the active
            space stays active; switch with `activate_space`) instead of replacing them.
        update: refuse, rather than embed everything, when `output` holds no space of this model and settings.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if window_seconds <= 0 or hop_seconds <= 0:
        raise ValueError(f"window ({window_seconds} s) and hop ({hop_seconds} s) must be positive")
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index type {index_type!r}: choose one of {INDEX_TYPES}")
    check_overrides(index_type, index_params)
    started = time.perf_counter()
    # `accelerate launch` on CPUs only (ACCELERATE_USE_CPU=1) needs cpu=True for the gloo process group.
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    say = log or (lambda line: print(line, file=sys.stderr))
    if not state.is_main_process:
        say = lambda line: None  # noqa: E731 - one voice per run
    output = Path(output)
    if output.exists() and not (output / META_FILE).is_file():
        raise ValueError(f"--output {output} exists and is not a search index (no {META_FILE}): choose a new folder")
    work = output.with_name(f".{output.name}.partial")
    with _build_lock(work, output, state):
        items = list_source(source, split=split, audio_column=audio_column)
        model, processor = load_clap_model(model_name, state.device)
        rate = processor.feature_extractor.sampling_rate
        # A local folder is recorded by its absolute path, so that the index finds its model from any directory.
        name = str(Path(model_name).resolve()) if Path(model_name).is_dir() else str(model_name)
        settings = _settings(model_fingerprint(model, name), window_seconds, hop_seconds, rate)

        recorded = _recorded_settings(work, say)
        if recorded is not None and not _same_settings(recorded, settings):
            raise ValueError(
                f"{work} holds an interrupted run with another model or window / hop: delete it to start over, or "
                "rerun with the same model and settings to resume it"
            )
        state.wait_for_everyone()
        if state.is_main_process:
            work.mkdir(parents=True, exist_ok=True)
            _atomic_write(work / SETTINGS_FILE, lambda p: Path(p).write_text(json.dumps(settings)))
            _drop_unreadable(work, model.config.projection_dim, say)
        state.wait_for_everyone()
        manifest, previous = _previous_space(output, settings, say)
        if update and previous is None:
            raise ValueError(
                f"--update: {output} holds no index of this model with window {window_seconds:g} s and hop "
                f"{hop_seconds:g} s to update: drop --update to build one"
            )
        dim = model.config.projection_dim
        done, by_hash = _done(_shard_files(work, previous))
        todo = [item for item in items if done.get(item.key) != item.stamp]
        # Only the sounds whose stamp changed are read for their hash; the main process reads them, once.
        hashes = [{item.key: content_hash(item.audio_value()) for item in todo} if state.is_main_process else None]
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(hashes)
        hashes = hashes[0]
        moved: set[str] = set()
        if by_hash:
            moved = {item.key for item in todo if hashes.get(item.key) in by_hash}
            if state.is_main_process:
                _reuse_moved(work, todo, hashes, by_hash, dim)
            todo = [item for item in todo if item.key not in moved]
        say(
            f"{len(items)} sounds: {len(items) - len(todo) - len(moved)} already indexed, {len(moved)} renamed, "
            f"moved or touched (reused by content), {len(todo)} to embed"
            + (f" in {state.num_processes} processes" if state.num_processes > 1 else "")
        )

        writer = _ShardWriter(work, state.process_index, dim, files_per_shard, hashes)
        window_samples = int(round(window_seconds * rate))
        max_peak = processor.feature_extractor.max_peak
        mine = todo[state.process_index :: state.num_processes]
        bar = tqdm(
            total=len(mine),
            unit="file",
            desc="index",
            file=sys.stderr,
            disable=None if (progress and state.is_main_process) else True,
        )
        with bar:
            for first in range(0, len(mine), batch_size):
                batch, waves = [], []
                for item in mine[first : first + batch_size]:
                    value = item.audio_value()
                    if _is_long_file(value):
                        try:
                            with AudioFileSamples(value, rate) as samples:
                                duration = samples.num_samples / rate
                                clip, starts, ends, windows = long_file_embeddings(
                                    model, processor, samples, window_seconds, hop_seconds, batch_size
                                )
                        except (RuntimeError, ValueError) as error:  # soundfile failing mid-file (a truncated file)
                            writer.fail(item, f"cannot read {value}: {type(error).__name__}: {error}")
                            say(f"skipped {item.key}: {error}")
                            continue
                        spans = [("clip", 0.0, duration)] + [
                            ("window", float(s), float(e)) for s, e in zip(starts, ends)
                        ]
                        writer.add(item, spans, duration, np.concatenate([clip[None], windows]))
                        continue
                    try:
                        waves.append(_decode_for_embedding(value, rate, max_peak))
                        batch.append(item)
                    except AudioDecodeError as error:
                        writer.fail(item, str(error))
                        say(f"skipped {item.key}: {error}")
                clips = clip_embeddings(model, processor, waves, window_samples) if waves else []
                for item, wave, clip in zip(batch, waves, clips):
                    duration = len(wave) / rate
                    spans, vectors = [("clip", 0.0, duration)], [clip[None]]
                    if len(wave) > window_samples:
                        starts, ends, windows = timed_window_embeddings(
                            model, processor, wave, window_seconds, hop_seconds, batch_size
                        )
                        spans += [("window", float(s), float(e)) for s, e in zip(starts, ends)]
                        vectors.append(windows)
                    writer.add(item, spans, duration, np.concatenate(vectors))
                bar.update(len(mine[first : first + batch_size]))
        writer.flush()
        state.wait_for_everyone()
        if not state.is_main_process:
            return None

        table, failures = _merge(_shard_files(work, previous), items)
        for failure in failures:
            say(f"failed: {failure['key']}: {failure['error']}")
        if not len(table):
            named = source if isinstance(source, (str, os.PathLike)) else "the dataset"
            raise ValueError(
                f"no sound could be decoded from {named} ({len(failures)} of {len(items)} files failed; see the "
                "'failed:' lines above): replace or remove those files and run again"
            )
        meta = {
            "format": FORMAT,
            "format_version": SPACE_FORMAT_VERSION,
            **settings,
            "source": str(source),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        # How to open the source again (the page plays dataset rows from it): an in-memory dataset cannot be.
        if isinstance(source, (str, os.PathLike)):
            local = Path(source).exists()
            where = str(Path(source).resolve()) if local else str(source)
            meta["reopen"] = {"source": where, "split": split, "audio_column": audio_column}
        recall = _write_index(
            output, table, failures, meta, index_type, index_params, manifest, add_space, sounds=metadata_table(items)
        )
        shutil.rmtree(work)
        if recall is not None:
            say(f"{index_type} index recall@10 against exact search: {recall:.4f}")
        return IndexSummary(
            output=output,
            num_files=meta["num_files"],
            num_vectors=meta["num_vectors"],
            audio_seconds=meta["audio_hours"] * 3600,
            embedded_files=len(todo),
            reused_files=len(items) - len(todo) - len(moved),
            moved_files=len(moved),
            space=space_key(settings["model"]),
            failed=failures,
            seconds=time.perf_counter() - started,
            recall_at_10=recall,
        )


__all__ = [
    "FORMAT",
    "BuildLockedError",
    "DamagedIndexError",
    "DamagedShardError",
    "IndexSummary",
    "activate_space",
    "build_index",
    "embeddings_of",
    "list_spaces",
    "open_space",
    "read_index_meta",
    "read_manifest",
    "remove_space",
    "space_key",
]
