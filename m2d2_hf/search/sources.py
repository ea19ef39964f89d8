"""What `m2d2-hf index` reads: the items of a sound collection, each with an identity and a content stamp.

A source is a folder of audio files (found recursively by extension), an audiofolder (a folder with a
`metadata.csv` / `metadata.jsonl` / `metadata.parquet` whose `file_name` column holds paths relative to it), a
metadata / list file itself (CSV, TSV, JSONL, Parquet with a `file_name`, `path` or `audio` column, relative to the
file's folder), or a `datasets` dataset (a loaded `Dataset`, a `save_to_disk` folder, or a hub id / dataset path for
`datasets.load_dataset`). What kind of source a path is and its rows come from the data layer (`m2d2_hf.data`).

The stamp says when an item must be looked at again: a file's size and modification time, a dataset row's dataset
fingerprint (which `datasets` changes whenever the data changes). Its content hash (`content_hash`, read only when the
stamp changed) then says whether it must be embedded again: a renamed, moved, copied or touched file is not.
"""

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.audio import AUDIO_EXTENSIONS
from ..data.sources import (
    METADATA_NAMES,
    TABLE_SUFFIXES,
    audio_files_below,
    cast_audio_undecoded,
    choose_split,
    is_saved_dataset,
    load_saved_dataset,
    metadata_rows,
    source_kind,
)


PATH_COLUMNS = ("file_name", "path", "audio")


class _DatasetRow:
    """The undecoded audio cell of one dataset row, read only when the item is embedded."""

    def __init__(self, dataset, column: str, row: int):
        self.dataset, self.column, self.row = dataset, column, row

    def __call__(self) -> Any:
        return self.dataset[self.row][self.column]


@dataclass(frozen=True)
class SourceItem:
    """One sound of the collection.

    Attributes:
        key: its identity in the index (the absolute file path, or `<dataset>#<row>`).
        stamp: changes when its content changes.
        path: a local file to play it from, or None (dataset rows held as bytes).
        audio: the file path, or a `_DatasetRow` giving the `{"bytes", "path"}` cell.
        metadata: its other columns in the source (a metadata table's row, a dataset row's scalar columns), which
            searches filter on (`where=`) and hybrid ranking reads words from.
    """

    key: str
    stamp: str
    path: str | None
    audio: Any
    metadata: dict = field(default_factory=dict, compare=False)

    def audio_value(self) -> Any:
        """What `m2d2_hf.data.audio.decode_audio` takes."""
        return self.audio() if callable(self.audio) else self.audio


def stat_stamp(status: os.stat_result) -> str:
    """`size:mtime_ns` of a file's status: what the index records, and the page compares before serving it."""
    return f"{status.st_size}:{status.st_mtime_ns}"


def file_stamp(path: str) -> str:
    """`stat_stamp` of a file, or `missing` (the item then fails to decode and is listed as failed)."""
    try:
        return stat_stamp(os.stat(path))
    except OSError:
        return "missing"


def content_hash(value: Any) -> str | None:
    """The sha256 (hex) of a sound's encoded bytes: a file path's contents, or a dataset cell's `bytes` (else its
    `path`); None when there is nothing to read (a missing file: the sound then fails to decode and is listed). The
    bytes, not the decoded samples: reading is far cheaper than decoding, and a re-encoded file is embedded again
    anyway."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            return hashlib.sha256(data).hexdigest()
        value = value.get("path")
    if not isinstance(value, (str, os.PathLike)):
        return None
    try:
        with open(value, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def _file_item(path: Path, metadata: dict | None = None) -> SourceItem:
    resolved = str(path.resolve())
    return SourceItem(resolved, file_stamp(resolved), resolved, resolved, metadata or {})


def _audio_files(folder: Path) -> list[SourceItem]:
    files = audio_files_below(folder)
    if not files:
        raise ValueError(
            f"{folder} holds no audio files ({', '.join(AUDIO_EXTENSIONS)}) and no metadata file "
            f"({', '.join(METADATA_NAMES)})"
        )
    return [_file_item(path) for path in files]


def _table_items(table_path: Path, split: str | None, split_column: str) -> list[SourceItem]:
    rows, path_column = metadata_rows(table_path, PATH_COLUMNS, split, split_column)
    base = table_path.parent
    return [
        _file_item(base / str(row[path_column]), {name: value for name, value in row.items() if name != path_column})
        for row in rows
    ]


def _dataset_metadata(dataset, audio_column: str) -> list[dict]:
    """The scalar columns (strings, numbers, booleans; class labels as their names) of every row of `dataset`."""
    from datasets import ClassLabel, Value

    features = dataset.features or {}
    scalar = ("string", "large_string", "bool") + tuple(
        f"{kind}{bits}" for kind in ("int", "uint", "float") for bits in (8, 16, 32, 64)
    )
    names = [
        name
        for name, feature in features.items()
        if name != audio_column
        and (isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype in scalar))
    ]
    if not names:
        return [{} for _ in range(len(dataset))]
    columns = dataset.select_columns(names).to_dict()
    for name in names:
        if isinstance(features[name], ClassLabel):
            labels = features[name].names
            columns[name] = [labels[v] if v is not None and 0 <= v < len(labels) else None for v in columns[name]]
    return [dict(zip(names, values)) for values in zip(*(columns[name] for name in names))]


def _dataset_items(dataset, name: str, audio_column: str) -> list[SourceItem]:
    if audio_column not in dataset.column_names:
        raise ValueError(f"the dataset {name} has no audio column {audio_column!r} (columns: {dataset.column_names})")
    dataset = cast_audio_undecoded(dataset, audio_column)
    stamp = getattr(dataset, "_fingerprint", None) or "unknown"
    return [
        SourceItem(f"{name}#{row}", stamp, None, _DatasetRow(dataset, audio_column, row), metadata)
        for row, metadata in enumerate(_dataset_metadata(dataset, audio_column))
    ]


def _load_dataset(source: str, split: str | None):
    import datasets

    if is_saved_dataset(source):
        if split is not None and not (Path(source) / "dataset_dict.json").is_file():
            raise ValueError(f"the dataset {source} is a single split: drop --split {split}")
        return load_saved_dataset(source, split)
    try:
        dataset = datasets.load_dataset(source) if split is None else datasets.load_dataset(source, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as error:  # unknown id, bad config, offline
        raise ValueError(
            f"{source} is neither a folder of audio files, a metadata file, nor a dataset `datasets` can load: {error}"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):  # no split asked for: the only one
        dataset = dataset[choose_split(list(dataset), None, f"the dataset {source}")]
    return dataset


def list_source(
    source: Any, split: str | None = None, split_column: str = "split", audio_column: str = "audio"
) -> list[SourceItem]:
    """The items of `source` (see the module docstring), in a stable order. `split` keeps one split: a table's rows
    whose `split_column` equals it, or a dataset's split of that name."""
    if not isinstance(source, (str, os.PathLike)):
        name = getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
        return _dataset_items(source, name, audio_column)
    kind = source_kind(source, split=None)  # a split is a column of the metadata here, not a subfolder
    if kind.kind == "audiofolder" or (kind.kind in ("table", "parquet") and len(kind.files) == 1):
        items = _table_items(Path(kind.metadata or kind.files[0]), split, split_column)
    elif kind.kind in ("saved_dataset", "hub"):
        name = str(Path(source).resolve()) if kind.kind == "saved_dataset" else str(source)
        items = _dataset_items(_load_dataset(str(source), split), name, audio_column)
    elif kind.kind == "audio_files":
        if split is not None:
            raise ValueError(f"--split needs a metadata file with a {split_column!r} column; {source} has none")
        items = _audio_files(Path(source))
    else:
        raise ValueError(
            f"{source} holds {kind.kind} shards, which the index does not read: give a folder of audio files, a "
            f"metadata table ({', '.join(TABLE_SUFFIXES)}) or a dataset"
        )
    check_unique(items)
    return items


def check_unique(items: Sequence[SourceItem]) -> None:
    """A collection lists each sound once: duplicates would be searched twice and resume could not tell them apart."""
    seen = set()
    for item in items:
        if item.key in seen:
            raise ValueError(f"{item.key} is listed twice in the source: list each sound once")
        seen.add(item.key)


def metadata_table(items: Sequence[SourceItem]):
    """The metadata of `items` as a pyarrow Table, one row per item: `key`, then each metadata column, typed (a
    column of mixed or nested values becomes strings, so that filters compare it as text); None when no item has
    metadata."""
    import pyarrow as pa

    names = list(dict.fromkeys(name for item in items for name in item.metadata if name != "key"))
    if not names:
        return None
    columns = {"key": pa.array([item.key for item in items], pa.string())}
    for name in names:
        values = [item.metadata.get(name) for item in items]
        try:
            column = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            column = None
        kinds = (pa.types.is_string, pa.types.is_boolean, pa.types.is_integer, pa.types.is_floating)
        if column is None or not any(kind(column.type) for kind in kinds):  # nested, dates, mixed, all null
            column = pa.array([None if value is None else str(value) for value in values], pa.string())
        columns[name] = column
    return pa.table(columns)


__all__ = ["SourceItem", "content_hash", "file_stamp", "list_source", "metadata_table", "stat_stamp"]
