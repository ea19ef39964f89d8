"""Data sources: what kind of source a path is, and its metadata rows.

The package reads its audio collections (training streams, evaluation sets, the search index, caption tables) from:

- an audiofolder: a folder with a `metadata.csv` / `.jsonl` / `.parquet` whose `file_name` column holds paths
  relative to the folder (a `<split>/` subfolder with its own metadata is preferred when a split is asked for);
- a metadata / list file itself (CSV, TSV, JSONL, Parquet; relative paths start at the file's folder);
- a `save_to_disk` folder of a `Dataset` or a `DatasetDict`;
- Parquet or WebDataset `.tar` shards (a folder of them, a glob, or a list);
- a plain folder of audio files;
- otherwise a hub id (or anything `datasets.load_dataset` takes).

`source_kind` is the one place that tells them apart; the readers (`read_table`, `metadata_rows`) and the `datasets`
helpers (`cast_audio_undecoded`, `load_saved_dataset`, `choose_split`) serve every consumer.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audio import AUDIO_EXTENSIONS


METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")
SOURCE_KINDS = ("audiofolder", "table", "saved_dataset", "parquet", "webdataset", "audio_files", "hub")


@dataclass(frozen=True)
class DataSource:
    """What a source is.

    Attributes:
        kind: one of `SOURCE_KINDS`.
        path: the source as given (a folder, a file, a glob or a hub id).
        metadata: the metadata / list file of an `audiofolder` or `table` source.
        files: the shards of a `parquet` / `webdataset` source.
    """

    kind: str
    path: str
    metadata: str | None = None
    files: list[str] = field(default_factory=list)

    @property
    def base(self) -> str | None:
        """The folder relative paths of the metadata start from."""
        return os.path.dirname(os.path.abspath(self.metadata)) if self.metadata else None


def file_stem(path: Any) -> str | None:
    """The file name of `path` without its extension, and without a folder-less fsspec chain (`x.flac::y.zip`): the
    clip id when a row has none, for the audio streams and the caption tables alike (so they name clips the same)."""
    if not path:
        return None
    name = str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if "::" in name:
        name = name.split("::", 1)[0]
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


def has_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def is_saved_dataset(folder: str | os.PathLike) -> bool:
    """A `save_to_disk` folder: of a `Dataset` (state.json) or of a `DatasetDict` (dataset_dict.json)."""
    folder = Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in ("state.json", "dataset_dict.json"))


def find_metadata(folder: str | os.PathLike, split: str | None = None) -> str | None:
    """The audiofolder metadata file of `folder` (of its `<split>/` subfolder first, when `split` is given)."""
    folders = ([os.path.join(folder, split)] if split else []) + [os.fspath(folder)]
    for base in folders:
        for name in METADATA_NAMES:
            if os.path.isfile(os.path.join(base, name)):
                return os.path.join(base, name)
    return None


def kind_of_files(files: Sequence[str]) -> str:
    """`parquet`, `webdataset` or `table` for a list of files of one type."""
    extensions = {os.path.basename(f).lower().rsplit(".", 1)[-1] for f in files}
    if extensions <= {"parquet"}:
        return "parquet"
    if extensions <= {"tar"}:
        return "webdataset"
    if extensions <= {"csv", "tsv", "jsonl", "json"}:
        return "table"
    raise ValueError(
        f"Cannot read a mix of file types {sorted(extensions)}: pass Parquet shards, WebDataset .tar shards, or a "
        f"CSV/JSONL list of audio paths."
    )


def split_files(files: list[str], split: str) -> list[str]:
    """The files of `split` when their names say so (`<split>/...` or `<split>-*`), else all of them."""
    for predicate in (
        lambda f: f"/{split}/" in f.replace("\\", "/"),
        lambda f: os.path.basename(f).startswith((f"{split}-", f"{split}_", f"{split}.")),
    ):
        chosen = [f for f in files if predicate(f)]
        if chosen:
            return chosen
    return files


def source_kind(source: str | os.PathLike | Sequence[str | os.PathLike], split: str | None = None) -> DataSource:
    """
    What kind of source `source` is (see the module docstring), in this order: a list of files (by their type), an
    audiofolder, a `save_to_disk` folder, a folder of Parquet / `.tar` shards (the `split`'s when their names say
    so), a plain folder of audio files; a metadata file (CSV/TSV/JSONL: `table`, one `.parquet`: `parquet` shards);
    a glob; otherwise a hub id.

    Raises:
        ValueError: for a list of mixed file types, or an existing file that is neither a table nor a shard.
    """
    if isinstance(source, (list, tuple)):
        files = [os.fspath(f) for f in source]
        return _files_source(files, ",".join(files))
    path = os.fspath(source)
    if os.path.isdir(path):
        metadata = find_metadata(path, split)
        if metadata is not None:
            return DataSource("audiofolder", path, metadata=metadata)
        if is_saved_dataset(path):
            return DataSource("saved_dataset", path)
        for kind, extension in (("parquet", "parquet"), ("webdataset", "tar")):
            files = sorted(glob.glob(os.path.join(path, "**", f"*.{extension}"), recursive=True))
            if files:
                return DataSource(kind, path, files=split_files(files, split) if split else files)
        return DataSource("audio_files", path)
    if os.path.isfile(path):
        if not path.lower().endswith((*TABLE_SUFFIXES, ".tar")):
            raise ValueError(f"{path} is a file but not a metadata table ({', '.join(TABLE_SUFFIXES)}) or a shard")
        return _files_source([path], path)
    if has_glob(path):
        # A remote pattern (hf://..., s3://...) matches nothing here: datasets resolves it.
        return _files_source(sorted(glob.glob(path, recursive=True)) or [path], path)
    return DataSource("hub", path)


def _files_source(files: list[str], path: str) -> DataSource:
    kind = kind_of_files(files)
    return DataSource(kind, path, metadata=files[0] if kind == "table" else None, files=files)


def audio_files_below(folder: str | os.PathLike) -> list[Path]:
    """The audio files below `folder` (recursively, by extension, any case), sorted."""
    extensions = {f".{extension}" for extension in AUDIO_EXTENSIONS}
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in extensions)


def read_table(path: str | os.PathLike, string_columns: Sequence[str] = (), all_strings: bool = False):
    """A metadata / list file (CSV, TSV, JSONL, Parquet) as a pyarrow Table. `string_columns` of a CSV stay strings
    (ids such as `00042`); `all_strings` reads every CSV column as strings, as `csv.DictReader` would."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    path = os.fspath(path)
    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as handle:
            header = handle.readline()
        delimiter = "\t" if lower.endswith(".tsv") else ","
        names = [name.strip().strip('"') for name in header.rstrip("\r\n").split(delimiter)]
        wanted = names if all_strings else [name for name in string_columns if name in names]
        return pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(
                column_types={name: pa.string() for name in wanted}, strings_can_be_null=False
            ),
        )
    if lower.endswith((".jsonl", ".json")):
        return pajson.read_json(path)
    if lower.endswith(".parquet"):
        return pq.read_table(path)
    raise ValueError(f"Unsupported metadata file {path}: expected .csv, .tsv, .jsonl or .parquet")


def resolve_path(base: str | os.PathLike | None, relative: Any) -> str | None:
    """A row's audio path: None for an empty cell, else relative to `base` unless absolute or a URL."""
    if relative in (None, ""):
        return None
    path = str(relative)
    if base is not None and not os.path.isabs(path) and "://" not in path:
        path = os.path.join(base, path)
    return path


def metadata_rows(
    path: str | os.PathLike,
    path_columns: Sequence[str] = ("file_name",),
    split: str | None = None,
    split_column: str = "split",
    all_strings: bool = False,
) -> tuple[list[dict], str]:
    """
    The rows of a metadata file and the name of its path column (the first of `path_columns` it has); with `split`
    only the rows whose `split_column` equals it. Paths stay as written (resolve them with `resolve_path` against the
    file's folder).

    Raises:
        ValueError: a file without any of the path columns, a `split` without a split column, or no rows.
    """
    table = read_table(path, string_columns=path_columns, all_strings=all_strings)
    columns = table.column_names
    path_column = next((column for column in path_columns if column in columns), None)
    if path_column is None:
        raise ValueError(f"{path} has none of the path columns {tuple(path_columns)} (columns: {columns})")
    rows = table.to_pylist()
    if split is not None:
        if split_column not in columns:
            raise ValueError(f"split {split!r} was asked for but {path} has no {split_column!r} column")
        rows = [row for row in rows if row[split_column] == split]
    if not rows:
        raise ValueError(f"{path} lists no audio files" + (f" with {split_column} == {split!r}" if split else ""))
    return rows, path_column


def cast_audio_undecoded(dataset, audio_column: str | None = None):
    """Cast `Audio` columns to `Audio(decode=False)` (the package decodes with `decode_audio`): the named one and
    WebDataset's per-extension ones, or every one when `audio_column` is None."""
    from datasets import Audio

    features = getattr(dataset, "features", None)
    if not features:
        return dataset
    for name, feature in features.items():
        wanted = audio_column is None or name == audio_column or name in AUDIO_EXTENSIONS
        if isinstance(feature, Audio) and wanted:
            dataset = dataset.cast_column(name, Audio(decode=False))
    return dataset


def choose_split(names: Sequence[str], split: str | None, source: str = "the dataset") -> str:
    """The split to read: `split` itself, or the only one.

    Raises:
        ValueError: when `split` is not a split and there are several to choose from.
    """
    if split in names:
        return split
    if len(names) == 1:
        return names[0]
    raise ValueError(f"{source} has the splits {list(names)}: choose one with --split (the `split` argument)")


def load_saved_dataset(folder: str | os.PathLike, split: str | None = None):
    """A `save_to_disk` folder as a `Dataset` (the `split` of a `DatasetDict`, or its only one)."""
    import datasets

    dataset = datasets.load_from_disk(os.fspath(folder))
    if isinstance(dataset, datasets.DatasetDict):
        if split is not None and split not in dataset:
            raise ValueError(f"the dataset {folder} has no split {split!r}: choose one of {list(dataset)}")
        dataset = dataset[choose_split(list(dataset), split, f"the dataset {folder}")]
    return dataset


__all__ = [
    "METADATA_NAMES",
    "SOURCE_KINDS",
    "TABLE_SUFFIXES",
    "DataSource",
    "audio_files_below",
    "cast_audio_undecoded",
    "choose_split",
    "file_stem",
    "find_metadata",
    "is_saved_dataset",
    "kind_of_files",
    "load_saved_dataset",
    "metadata_rows",
    "read_table",
    "resolve_path",
    "source_kind",
    "split_files",
]
