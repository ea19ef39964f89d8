"""What `m2d2-hf index` reads: the items of a sound collection, each with an identity and a content stamp.

A source is a folder of audio files (found recursively by extension), an audiofolder (a folder with a
`metadata.csv` / `metadata.jsonl` / `metadata.parquet` whose `file_name` column holds paths relative to it), a
metadata / list file itself (CSV, TSV, JSONL, Parquet with a `file_name`, `path` or `audio` column, relative to the
file's folder), or a `datasets` dataset (a loaded `Dataset`, a `save_to_disk` folder, or a hub id / dataset path for
`datasets.load_dataset`). Tables are read with the training pipeline's reader (`m2d2_hf.training.data`).

The stamp says when an item must be embedded again: a file's size and modification time, a dataset row's dataset
fingerprint (which `datasets` changes whenever the data changes).
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..training.data import AUDIO_EXTENSIONS, METADATA_NAMES, _cast_audio_undecoded, _read_table


PATH_COLUMNS = ("file_name", "path", "audio")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


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
    """

    key: str
    stamp: str
    path: str | None
    audio: Any

    def audio_value(self) -> Any:
        """What `m2d2_hf.training.data.decode_audio` takes."""
        return self.audio() if callable(self.audio) else self.audio


def file_stamp(path: str) -> str:
    """`size:mtime_ns`, or `missing` (the item then fails to decode and is listed as failed)."""
    try:
        stat = os.stat(path)
    except OSError:
        return "missing"
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _file_item(path: Path) -> SourceItem:
    resolved = str(path.resolve())
    return SourceItem(resolved, file_stamp(resolved), resolved, resolved)


def _audio_files(folder: Path) -> list[SourceItem]:
    extensions = {f".{extension}" for extension in AUDIO_EXTENSIONS}
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    if not files:
        raise ValueError(
            f"{folder} holds no audio files ({', '.join(AUDIO_EXTENSIONS)}) and no metadata file "
            f"({', '.join(METADATA_NAMES)})"
        )
    return [_file_item(path) for path in files]


def _table_items(table_path: Path, split: str | None, split_column: str) -> list[SourceItem]:
    table = _read_table(str(table_path), string_columns=PATH_COLUMNS)
    columns = table.column_names
    path_column = next((column for column in PATH_COLUMNS if column in columns), None)
    if path_column is None:
        raise ValueError(f"{table_path} has none of the path columns {PATH_COLUMNS} (columns: {columns})")
    rows = table.to_pylist()
    if split is not None:
        if split_column not in columns:
            raise ValueError(f"split {split!r} was asked for but {table_path} has no {split_column!r} column")
        rows = [row for row in rows if row[split_column] == split]
    if not rows:
        raise ValueError(
            f"{table_path} lists no audio files" + (f" with {split_column} == {split!r}" if split else "")
        )
    base = table_path.parent
    return [_file_item(base / str(row[path_column])) for row in rows]


def _dataset_items(dataset, name: str, audio_column: str) -> list[SourceItem]:
    if audio_column not in dataset.column_names:
        raise ValueError(f"the dataset {name} has no audio column {audio_column!r} (columns: {dataset.column_names})")
    dataset = _cast_audio_undecoded(dataset, audio_column)
    stamp = getattr(dataset, "_fingerprint", None) or "unknown"
    return [
        SourceItem(f"{name}#{row}", stamp, None, _DatasetRow(dataset, audio_column, row))
        for row in range(len(dataset))
    ]


def _is_saved_dataset(folder: Path) -> bool:
    """A `save_to_disk` folder: of a `Dataset` (state.json) or of a `DatasetDict` (dataset_dict.json)."""
    return folder.is_dir() and any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def _load_dataset(source: str, split: str | None):
    import datasets

    if _is_saved_dataset(Path(source)):
        dataset = datasets.load_from_disk(source)
    else:
        try:
            dataset = datasets.load_dataset(source) if split is None else datasets.load_dataset(source, split=split)
        except (FileNotFoundError, ValueError, ConnectionError) as error:  # unknown id, bad config, offline
            raise ValueError(
                f"{source} is neither a folder of audio files, a metadata file, nor a dataset `datasets` can load: "
                f"{error}"
            ) from error
    if isinstance(dataset, datasets.DatasetDict):
        if split is None and len(dataset) != 1:
            raise ValueError(f"the dataset {source} has the splits {list(dataset)}: choose one with --split")
        if split is not None and split not in dataset:
            raise ValueError(f"the dataset {source} has no split {split!r}: choose one of {list(dataset)}")
        dataset = dataset[split] if split is not None else next(iter(dataset.values()))
    elif split is not None and _is_saved_dataset(Path(source)):  # load_dataset(split=...) already applied it
        raise ValueError(f"the dataset {source} is a single split: drop --split {split}")
    return dataset


def list_source(
    source: Any, split: str | None = None, split_column: str = "split", audio_column: str = "audio"
) -> list[SourceItem]:
    """The items of `source` (see the module docstring), in a stable order. `split` keeps one split: a table's rows
    whose `split_column` equals it, or a dataset's split of that name."""
    if not isinstance(source, (str, os.PathLike)):
        name = getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
        return _dataset_items(source, name, audio_column)
    path = Path(source)
    if path.is_dir():
        metadata = [path / name for name in METADATA_NAMES if (path / name).is_file()]
        if metadata:
            items = _table_items(metadata[0], split, split_column)
        elif _is_saved_dataset(path):
            items = _dataset_items(_load_dataset(str(path), split), str(path.resolve()), audio_column)
        else:
            if split is not None:
                raise ValueError(f"--split needs a metadata file with a {split_column!r} column; {path} has none")
            items = _audio_files(path)
    elif path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        items = _table_items(path, split, split_column)
    elif path.exists():
        raise ValueError(f"{path} is a file but not a metadata table ({', '.join(TABLE_SUFFIXES)})")
    else:
        items = _dataset_items(_load_dataset(str(source), split), str(source), audio_column)
    check_unique(items)
    return items


def check_unique(items: Sequence[SourceItem]) -> None:
    """A collection lists each sound once: duplicates would be searched twice and resume could not tell them apart."""
    seen = set()
    for item in items:
        if item.key in seen:
            raise ValueError(f"{item.key} is listed twice in the source: list each sound once")
        seen.add(item.key)


__all__ = ["SourceItem", "file_stamp", "list_source"]
