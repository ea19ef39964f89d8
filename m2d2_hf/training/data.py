"""Audio streams for training: `datasets` streaming in, padded waveform batches out.

The pipeline has three parts, split by where they run:

1. `load_audio_stream` (DataLoader workers): a `datasets.IterableDataset` over a local audiofolder, Parquet shards,
   WebDataset tars, a CSV/JSONL list of audio paths or a hub dataset, always streamed. Each example is decoded with
   soundfile (torchcodec as the fallback, e.g. for m4a), averaged to mono, resampled with torchaudio and cut to its
   first `max_seconds`. A broken item never raises: it comes out with an empty `audio` and a short `error`.
2. `AudioBatchCollator` (DataLoader workers too, but its counts travel in the batch): drops and counts the broken
   items, zero-pads the rest into `[B, L]`, optionally draws one cached caption embedding per clip.
3. `random_log_mel_crops` (training device): after the batch log-mel (`M2D2FeatureExtractor.log_mel`), a random
   fixed-length crop per clip, zero-padded at the end in raw log-mel space, as the original's training crops.

Sharding: `datasets.distributed.split_dataset_by_node` gives each process whole shards when the shard count is a
multiple of the number of processes (otherwise every process reads everything and keeps every n-th example), and
the DataLoader's workers then split a process's shards among themselves. Write Parquet/WebDataset corpora with a
shard count that is a multiple of processes x workers. A local audiofolder is cut into `num_shards` shards here (the
`audiofolder` builder would make one shard per metadata file, i.e. one decoding worker).
"""

from __future__ import annotations

import glob
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch


logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "aac", "aiff", "aif", "au", "wma", "webm")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
# Columns that `load_audio_stream` always produces.
ID_KEY, AUDIO_KEY, ERROR_KEY = "id", "audio", "error"
# WebDataset bookkeeping columns of the `webdataset` builder.
_WDS_KEY, _WDS_URL = "__key__", "__url__"
_MAX_ERROR_CHARS = 200


# ----------------------------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------------------------


class AudioDecodeError(Exception):
    """An item that cannot become a waveform; its message is the short reason reported by the stream."""


def _read_source(value: Any) -> tuple[bytes | None, str | None]:
    """(encoded bytes, path) of an audio cell: datasets' Audio struct, raw binary, a path string or None."""
    if value is None:
        return None, None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    if isinstance(value, dict):
        data = value.get("bytes")
        path = value.get("path")
        if data is None and value.get("array") is not None:
            raise AudioDecodeError("decoded audio dicts are not supported: cast the column to Audio(decode=False)")
        return (bytes(data) if data is not None else None), path
    raise AudioDecodeError(f"unsupported audio cell of type {type(value).__name__}")


def _open_bytes(path: str) -> bytes:
    """Bytes of a local or remote (hf://, https://, zip://...) file."""
    if os.path.exists(path):
        with open(path, "rb") as handle:
            return handle.read()
    from datasets.utils.file_utils import xopen  # remote paths of streamed hub datasets

    with xopen(path, "rb") as handle:
        return handle.read()


def _decode_soundfile(data: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data)) as handle:
        rate = handle.samplerate
        frames = -1 if max_seconds is None else int(math.ceil(max_seconds * rate))
        samples = handle.read(frames=frames, dtype="float32", always_2d=True)  # [samples, channels]
    return samples.mean(axis=1, dtype=np.float32) if samples.shape[1] != 1 else samples[:, 0], rate


def _decode_torchcodec(data: bytes, max_seconds: float | None) -> tuple[np.ndarray, int]:
    from torchcodec.decoders import AudioDecoder

    decoder = AudioDecoder(data)
    if max_seconds is None:
        decoded = decoder.get_all_samples()
    else:
        decoded = decoder.get_samples_played_in_range(start_seconds=0.0, stop_seconds=max_seconds)
    samples = decoded.data  # [channels, samples] float32
    return samples.mean(dim=0).numpy().astype(np.float32, copy=False), int(decoded.sample_rate)


def decode_audio(value: Any, *, sampling_rate: int = 16000, max_seconds: float | None = 30.0) -> np.ndarray:
    """
    Decode one audio cell to a mono float32 waveform at `sampling_rate`, cut to its first `max_seconds`.

    `value` is datasets' Audio struct `{"bytes", "path"}` (bytes first, then the path), raw encoded bytes, or a path.
    soundfile decodes first; when it fails (e.g. m4a, or a format its libsndfile lacks) torchcodec/FFmpeg is tried.
    Channels are averaged; resampling is `torchaudio.functional.resample` (windowed sinc, its defaults). Non-finite
    samples are set to 0 when some remain finite.

    Raises:
        AudioDecodeError: with a short reason, for a missing, undecodable, empty or all-NaN/Inf item.
    """
    data, path = _read_source(value)
    if data is None:
        if not path:
            raise AudioDecodeError("no audio (empty cell)")
        try:
            data = _open_bytes(path)
        except Exception as error:  # noqa: BLE001 - any I/O failure is one skipped item
            raise AudioDecodeError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    if len(data) == 0:
        raise AudioDecodeError("empty file (0 bytes)")
    try:
        samples, rate = _decode_soundfile(data, max_seconds)
    except Exception as sf_error:  # noqa: BLE001
        try:
            samples, rate = _decode_torchcodec(data, max_seconds)
        except Exception as tc_error:  # noqa: BLE001
            raise AudioDecodeError(
                f"undecodable (soundfile: {type(sf_error).__name__}: {sf_error}; "
                f"torchcodec: {type(tc_error).__name__}: {tc_error})"
            ) from None
    if samples.size == 0:
        raise AudioDecodeError("zero-length audio (0 samples)")
    finite = np.isfinite(samples)
    if not finite.all():
        if not finite.any():
            raise AudioDecodeError("all samples are NaN/Inf")
        samples = np.where(finite, samples, np.float32(0.0))
    if rate != sampling_rate:
        import torchaudio

        samples = torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(samples)), rate, sampling_rate)
        samples = samples.numpy()
    if max_seconds is not None:
        samples = samples[: int(round(max_seconds * sampling_rate))]
    if samples.size == 0:
        raise AudioDecodeError("zero-length audio after resampling")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _stem(path: str | None) -> str | None:
    if not path:
        return None
    name = path.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if "::" in name:  # fsspec chained URLs, e.g. zip://x.flac::https://...
        name = name.split("::", 1)[0]
    dot = name.rfind(".")
    return name[:dot] if dot > 0 else name


class _DecodeExample:
    """The `.map` function of the stream (a class so that it pickles into spawned DataLoader workers)."""

    def __init__(
        self,
        audio_column: str,
        id_column: str | None,
        keep_columns: Sequence[str],
        sampling_rate: int,
        max_seconds: float | None,
        process_index: int,
        flatten_json: bool,
    ):
        self.audio_column = audio_column
        self.id_column = id_column
        self.keep_columns = list(keep_columns)
        self.sampling_rate = sampling_rate
        self.max_seconds = max_seconds
        self.process_index = process_index
        self.flatten_json = flatten_json

    def _audio_cell(self, example: dict) -> Any:
        if self.audio_column in example:
            return example[self.audio_column]
        # WebDataset: the audio sits under its extension (`flac`, `wav`, ...); the first present one is used.
        for extension in AUDIO_EXTENSIONS:
            if example.get(extension) is not None:
                return example[extension]
        return None

    def __call__(self, example: dict, index: int) -> dict:
        if self.flatten_json:
            example = _flatten_wds_json(example)
        cell = self._audio_cell(example)
        error = ""
        try:
            audio = decode_audio(cell, sampling_rate=self.sampling_rate, max_seconds=self.max_seconds)
        except AudioDecodeError as exc:
            audio, error = np.zeros(0, dtype=np.float32), str(exc)[:_MAX_ERROR_CHARS]
        except Exception as exc:  # noqa: BLE001 - whatever goes wrong, one item must not stop a run
            audio, error = np.zeros(0, dtype=np.float32), f"{type(exc).__name__}: {exc}"[:_MAX_ERROR_CHARS]

        clip_id = None
        if self.id_column is not None and example.get(self.id_column) is not None:
            clip_id = str(example[self.id_column])
        if clip_id is None:
            try:
                clip_id = _stem(_read_source(cell)[1])
            except AudioDecodeError:
                clip_id = None
        if clip_id is None and example.get(_WDS_KEY):
            clip_id = str(example[_WDS_KEY]).replace("\\", "/").rsplit("/", 1)[-1]
        if clip_id is None:
            # Unique within one DataLoader worker of one process only.
            clip_id = f"{self.process_index}-{index}"
        output = {ID_KEY: clip_id, AUDIO_KEY: audio, ERROR_KEY: error}
        for column in self.keep_columns:
            if column not in output:
                output[column] = example.get(column)
        return output


def _flatten_wds_json(example: dict) -> dict:
    """WebDataset: lift the fields of the `.json` member to the top level (existing columns win)."""
    meta = example.get("json")
    if isinstance(meta, dict):
        example = dict(example)
        for key, value in meta.items():
            example.setdefault(key, value)
    return example


class _FilterRow:
    """`filter_fn` applied to WebDataset rows with their `.json` fields lifted to the top level."""

    def __init__(self, filter_fn: Callable[[dict], bool]):
        self.filter_fn = filter_fn

    def __call__(self, example: dict) -> bool:
        return bool(self.filter_fn(_flatten_wds_json(example)))


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def _has_glob(text: str) -> bool:
    return any(char in text for char in "*?[")


def _kind_of_files(files: Sequence[str]) -> str:
    extensions = {os.path.basename(f).lower().rsplit(".", 1)[-1] for f in files}
    if extensions <= {"parquet"}:
        return "parquet"
    if extensions <= {"tar"}:
        return "webdataset"
    if extensions <= {"csv", "tsv"}:
        return "csv"
    if extensions <= {"jsonl", "json"}:
        return "json"
    raise ValueError(
        f"Cannot stream a mix of file types {sorted(extensions)}: pass Parquet shards, WebDataset .tar shards, or a "
        f"CSV/JSONL list of audio paths."
    )


def _split_files(files: list[str], split: str) -> list[str]:
    """The files of `split` when their names say so (`<split>/...` or `<split>-*`), else all of them."""
    for predicate in (
        lambda f: f"/{split}/" in f.replace("\\", "/"),
        lambda f: os.path.basename(f).startswith((f"{split}-", f"{split}_", f"{split}.")),
    ):
        chosen = [f for f in files if predicate(f)]
        if chosen:
            return chosen
    return files


def _read_table(path: str, string_columns: Sequence[str] = ()):
    """A metadata / list file (CSV, TSV, JSONL, Parquet) as a pyarrow Table; `string_columns` stay strings."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    lower = path.lower()
    if lower.endswith((".csv", ".tsv")):
        with open(path, newline="") as handle:
            header = handle.readline()
        delimiter = "\t" if lower.endswith(".tsv") else ","
        names = [name.strip().strip('"') for name in header.rstrip("\r\n").split(delimiter)]
        types = {name: pa.string() for name in string_columns if name in names}
        return pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False),
        )
    if lower.endswith((".jsonl", ".json")):
        return pajson.read_json(path)
    if lower.endswith(".parquet"):
        return pq.read_table(path)
    raise ValueError(f"Unsupported metadata file {path}: expected .csv, .tsv, .jsonl or .parquet")


def _table_rows(tables: list) -> Iterable[dict]:
    """Generator of `IterableDataset.from_generator`: one list element (a table slice and its base folder) per
    shard."""
    for table, base, path_column in tables:
        for row in table.to_pylist():
            relative = row.pop(path_column, None)
            path = None if relative in (None, "") else str(relative)
            if path is not None and base is not None and not os.path.isabs(path) and "://" not in path:
                path = os.path.join(base, path)
            row[AUDIO_KEY] = None if path is None else {"bytes": None, "path": path}
            yield row


def _path_list_stream(
    table_files: Sequence[tuple[str, str]], path_column: str, id_column: str | None, num_shards: int
):
    """Stream of rows from metadata / list files (each with the folder its relative paths start from)."""
    import datasets

    slices = []
    for path, base in table_files:
        table = _read_table(path, string_columns=[c for c in (path_column, id_column) if c])
        if path_column not in table.column_names:
            raise ValueError(f"{path} has no column {path_column!r} (columns: {table.column_names})")
        slices.append((table, base))
    total = sum(table.num_rows for table, _ in slices)
    if total == 0:
        raise ValueError(f"No rows in {[p for p, _ in table_files]}")
    shards = max(1, min(num_shards, total))
    bounds = np.linspace(0, total, shards + 1).round().astype(int)
    # Cut the concatenated rows into `shards` contiguous pieces, each possibly spanning several files.
    pieces: list[list] = [[] for _ in range(shards)]
    offset = 0
    for table, base in slices:
        for shard in range(shards):
            start, stop = max(bounds[shard], offset), min(bounds[shard + 1], offset + table.num_rows)
            if start < stop:
                pieces[shard].append((table.slice(start - offset, stop - start), base, path_column))
        offset += table.num_rows
    return datasets.IterableDataset.from_generator(_ShardRows(), gen_kwargs={"shards": pieces})


class _ShardRows:
    """Picklable generator function: the rows of the shard pieces it is given."""

    def __call__(self, shards: list) -> Iterable[dict]:
        for pieces in shards:
            yield from _table_rows(pieces)


def _local_folder_source(folder: str, split: str, num_shards: int, audio_column: str, id_column: str | None):
    import datasets

    base = folder
    if os.path.isdir(os.path.join(folder, split)):
        candidates = [os.path.join(folder, split, name) for name in METADATA_NAMES]
        if any(os.path.isfile(c) for c in candidates):
            base = os.path.join(folder, split)
    metadata = [os.path.join(base, name) for name in METADATA_NAMES if os.path.isfile(os.path.join(base, name))]
    if metadata:
        # audiofolder layout: relative `file_name` paths in a metadata file at the root.
        return _path_list_stream([(metadata[0], base)], "file_name", id_column, num_shards), "rows"
    if os.path.isfile(os.path.join(folder, "dataset_info.json")) and os.path.isfile(
        os.path.join(folder, "state.json")
    ):
        dataset = datasets.load_from_disk(folder)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        dataset = _cast_audio_undecoded(dataset, audio_column)
        return dataset.to_iterable_dataset(num_shards=max(1, min(num_shards, len(dataset)))), "datasets"
    for kind, extension in (("parquet", "parquet"), ("webdataset", "tar")):
        files = sorted(glob.glob(os.path.join(folder, "**", f"*.{extension}"), recursive=True))
        if files:
            return _files_source(_split_files(files, split), kind, split), kind
    # An audiofolder without metadata: every audio file below the folder (no split-name inference by datasets).
    patterns = [f"**/*.{ext}" for ext in AUDIO_EXTENSIONS] + [f"**/*.{ext.upper()}" for ext in AUDIO_EXTENSIONS]
    dataset = datasets.load_dataset(
        "audiofolder", data_dir=folder, data_files={split: patterns}, split=split, streaming=True
    )
    return dataset, "datasets"


def _files_source(files: Sequence[str], kind: str, split: str):
    import datasets

    builder = {"parquet": "parquet", "webdataset": "webdataset"}[kind]
    return datasets.load_dataset(builder, data_files={split: list(files)}, split=split, streaming=True)


def _cast_audio_undecoded(dataset, audio_column: str):
    """Cast every `Audio` column (the named one, or WebDataset's per-extension ones) to `Audio(decode=False)`."""
    from datasets import Audio

    features = getattr(dataset, "features", None)
    if not features:
        return dataset
    for name, feature in features.items():
        if isinstance(feature, Audio) and (name == audio_column or name in AUDIO_EXTENSIONS):
            dataset = dataset.cast_column(name, Audio(decode=False))
    return dataset


def load_audio_stream(
    train_data: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    split: str = "train",
    audio_column: str = "audio",
    id_column: str | None = None,
    keep_columns: Sequence[str] = (),
    sampling_rate: int = 16000,
    max_seconds: float | None = 30.0,
    shuffle_buffer: int = 0,
    seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    filter_fn: Callable[[dict], bool] | None = None,
    num_shards: int | None = None,
    dataset_config: str | None = None,
    load_kwargs: dict | None = None,
):
    """
    Stream decoded training audio with `datasets` (always `streaming=True`).

    Args:
        train_data: one of
            - a local folder in audiofolder layout (a `metadata.csv`/`.jsonl`/`.parquet` with relative `file_name`
              paths, e.g. `shared/data/real_sounds`; a `<split>/` subfolder with its own metadata is preferred), a
              folder of Parquet or WebDataset `.tar` shards (files under `<split>/` or named `<split>-*` when present,
              else all), a `save_to_disk` folder, or a plain folder of audio files;
            - Parquet shards (a glob or a list of paths) whose `audio_column` holds encoded bytes, as datasets' Audio
              struct `{"bytes", "path"}` or raw binary;
            - WebDataset `.tar` shards (a glob or list): members `<key>.flac`/`.wav`/`.mp3`/... and optional
              `<key>.json` (its fields become columns) / `<key>.txt` (column `txt`);
            - a CSV/TSV/JSONL file listing audio paths in `audio_column` (relative to the file's folder), like the
              original's `files_*.csv`;
            - otherwise a hub dataset id, loaded with `load_dataset(train_data, dataset_config, split=split,
              streaming=True, **load_kwargs)`.
        split: split to read (hub datasets, `<split>/` folders, `<split>-*` shard names).
        audio_column: the audio column (WebDataset: found by extension when absent).
        id_column: column holding the clip id; by default the file stem of the audio path (WebDataset: of the key),
            else `"<process_index>-<running index>"`.
        keep_columns: further columns to carry into the examples (e.g. a caption or label column); missing -> None.
        sampling_rate: output rate; other rates are resampled with torchaudio.
        max_seconds: keep the first `max_seconds` of each clip (the original cut its training audio at 30 s);
            None keeps everything.
        shuffle_buffer: > 0 shuffles the shard order and then the examples through a buffer of this many items
            (before decoding, so the buffer holds encoded audio). Call `.set_epoch(epoch)` each epoch to reshuffle.
        seed: shuffling seed (identical on every process: the processes share the shard order).
        process_index, num_processes: `split_dataset_by_node(rank=process_index, world_size=num_processes)`.
        filter_fn: predicate on the undecoded row (metadata; the audio cell is the undecoded struct), e.g.
            `lambda row: row["split"] == "train"`.
        num_shards: shards to cut a local audiofolder / path list into (default `16 * num_processes`; a multiple of
            `num_processes` so that every process gets whole shards). Files given as shards keep their own count.
        dataset_config, load_kwargs: passed to `load_dataset` for hub ids.

    Returns:
        `datasets.IterableDataset` of `{"id": str, "audio": np.float32 [samples], "error": str, **keep_columns}`.
        A missing, undecodable, empty or all-NaN item has `audio` of length 0 and a short `error`; it never raises.
        Decoding runs lazily in `.map`, i.e. in the DataLoader workers.
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"Need 0 <= process_index < num_processes, got {process_index} and {num_processes}")
    num_shards = num_shards or 16 * num_processes
    path_column = audio_column

    if isinstance(train_data, (list, tuple)):
        files = [os.fspath(f) for f in train_data]
        kind = _kind_of_files(files)
    else:
        train_data = os.fspath(train_data)
        files, kind = [], None
        if os.path.isdir(train_data):
            dataset, kind = _local_folder_source(train_data, split, num_shards, audio_column, id_column)
            if kind == "rows":
                path_column = AUDIO_KEY  # the rows carry their resolved paths as an audio struct
        elif os.path.isfile(train_data):
            files, kind = [train_data], _kind_of_files([train_data])
        elif _has_glob(train_data):
            files = sorted(glob.glob(train_data, recursive=True))
            if files:
                kind = _kind_of_files(files)
            else:  # a remote pattern (hf://..., s3://...): datasets resolves it
                kind = _kind_of_files([train_data])
                files = [train_data]
        else:
            dataset = datasets.load_dataset(
                train_data, dataset_config, split=split, streaming=True, **(load_kwargs or {})
            )
            kind = "datasets"
    if files:
        if kind in ("parquet", "webdataset"):
            dataset = _files_source(files, kind, split)
        else:  # CSV / JSONL lists of audio paths
            dataset = _path_list_stream(
                [(f, os.path.dirname(os.path.abspath(f))) for f in files], audio_column, id_column, num_shards
            )
            path_column = AUDIO_KEY

    dataset = _cast_audio_undecoded(dataset, audio_column)
    webdataset = kind == "webdataset"
    if filter_fn is not None:
        dataset = dataset.filter(_FilterRow(filter_fn) if webdataset else filter_fn)
    if num_processes > 1:
        dataset = split_dataset_by_node(dataset, rank=process_index, world_size=num_processes)
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)

    decode = _DecodeExample(
        audio_column=path_column,
        id_column=id_column,
        keep_columns=keep_columns,
        sampling_rate=sampling_rate,
        max_seconds=max_seconds,
        process_index=process_index,
        flatten_json=webdataset,
    )
    # Without `features` the examples pass through as returned (numpy arrays stay arrays, no Arrow round trip).
    columns = list(dataset.column_names) if dataset.column_names else None
    dataset = dataset.map(decode, with_indices=True, remove_columns=columns)
    # The input columns are unknown for generator-built streams: drop whatever `map` merged back in.
    outputs = [ID_KEY, AUDIO_KEY, ERROR_KEY]
    return dataset.select_columns(outputs + [c for c in keep_columns if c not in outputs])


# ----------------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------------


class AudioBatchCollator:
    """
    Collate stream examples into zero-padded waveform batches, dropping (and counting) the broken ones.

    Returns a dict with
        - `waveforms` `[B, L_max]` float32, zero-padded at the end (`[0, 0]` when every item was dropped: the
          trainer skips such a step),
        - `lengths` `[B]` int64: samples per clip, counting the `min_samples` zero padding (which is part of the clip,
          as in the original's data preparation) but not the batch padding,
        - `ids` list of str, `num_skipped` int (items dropped for an `error` or empty audio; sum it over batches and
          gather it across processes for the run's count),
        - with a `caption_table`: `caption_embeddings` `[B, D]` float32 (one of the clip's cached captions drawn
          uniformly at random, zeros when the clip has none) and `has_caption` `[B]` bool,
        - the `keep_columns` as lists.

    Args:
        caption_table: a `CaptionEmbeddingTable` (anything with `__contains__`, `get(id) -> [n, D]`,
            `embedding_size`).
        seed: seed of the collator's own `torch.Generator` for the caption draws. Draws are deterministic given the
            seed and the call order. In a DataLoader worker the generator is seeded with `seed + worker id` (each
            worker has its own copy of the collator); use a different seed per process.
        min_samples: zero-pad every clip to at least this many samples (the original padded its training audio to
            >= 6.1 s, i.e. `min_samples=97600` at 16 kHz).
        keep_columns: example columns to pass through as lists.
        max_warnings: how many skipped items are logged one by one; after that one summary warning per
            `warn_every` skipped items.
    """

    def __init__(
        self,
        caption_table: Any | None = None,
        *,
        seed: int = 0,
        min_samples: int = 0,
        keep_columns: Sequence[str] = (),
        max_warnings: int = 20,
        warn_every: int = 1000,
    ):
        self.caption_table = caption_table
        self.seed = int(seed)
        self.min_samples = int(min_samples)
        self.keep_columns = list(keep_columns)
        self.max_warnings = int(max_warnings)
        self.warn_every = max(1, int(warn_every))
        self.total_skipped = 0  # in this process (a worker's copy counts its own)
        self._generator: torch.Generator | None = None

    @property
    def generator(self) -> torch.Generator:
        if self._generator is None:
            info = torch.utils.data.get_worker_info()
            self._generator = torch.Generator().manual_seed(self.seed + (info.id if info is not None else 0))
        return self._generator

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "total_skipped": self.total_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.total_skipped = int(state.get("total_skipped", 0))

    def _warn_skipped(self, clip_id: str, reason: str) -> None:
        self.total_skipped += 1
        if self.total_skipped <= self.max_warnings:
            suffix = " (further skipped items are summarised)" if self.total_skipped == self.max_warnings else ""
            logger.warning(f"Skipping audio item {clip_id!r}: {reason}{suffix}")
        elif (self.total_skipped - self.max_warnings) % self.warn_every == 0:
            logger.warning(
                f"{self.total_skipped} audio items skipped so far in this process (latest {clip_id!r}: {reason})"
            )

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        kept, num_skipped = [], 0
        for example in examples:
            audio = example.get(AUDIO_KEY)
            error = example.get(ERROR_KEY) or ""
            size = 0 if audio is None else int(np.size(audio))
            if error or size == 0:
                num_skipped += 1
                self._warn_skipped(str(example.get(ID_KEY)), error or "empty audio")
                continue
            kept.append(example)

        waves = [torch.as_tensor(np.asarray(example[AUDIO_KEY], dtype=np.float32)).reshape(-1) for example in kept]
        lengths = torch.tensor([max(w.numel(), self.min_samples) for w in waves], dtype=torch.int64)
        max_length = int(lengths.max()) if len(waves) else 0
        waveforms = torch.zeros(len(waves), max_length, dtype=torch.float32)
        for row, wave in enumerate(waves):
            waveforms[row, : wave.numel()] = wave
        batch: dict[str, Any] = {
            "waveforms": waveforms,
            "lengths": lengths,
            "ids": [str(example[ID_KEY]) for example in kept],
            "num_skipped": num_skipped,
        }
        for column in self.keep_columns:
            batch[column] = [example.get(column) for example in kept]
        if self.caption_table is not None:
            batch["caption_embeddings"], batch["has_caption"] = self._captions(batch["ids"])
        return batch

    def _captions(self, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from .captions import draw_captions

        return draw_captions(self.caption_table, ids, self.generator)


# ----------------------------------------------------------------------------------------------------------------
# Crops on the training device
# ----------------------------------------------------------------------------------------------------------------


def frames_of(lengths: torch.Tensor | np.ndarray | int, hop_length: int = 160):
    """Valid log-mel frames of clips of `lengths` samples: `1 + lengths // hop_length` (centred STFT, even n_fft)."""
    return 1 + lengths // hop_length


def random_log_mel_crops(
    log_mel: torch.Tensor,
    num_frames: torch.Tensor,
    crop_frames: int,
    generator: torch.Generator | None = None,
    *,
    return_starts: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """
    One random `crop_frames`-frame crop per clip of a batch of RAW log-mel spectrograms (crop, then normalise).

    The start of clip i is uniform over `[0, num_frames[i] - crop_frames]` (0 when the clip is shorter); frames past
    a clip's `num_frames` (batch padding, or past the end of a short clip) are zeros, i.e. a short clip is zero-padded
    at its end in raw log-mel space, as the original's training crops. One gather, no per-clip Python loop.

    Args:
        log_mel: `[B, F, T]` raw log-mel (e.g. `M2D2FeatureExtractor.log_mel` of a padded batch), on any device.
        num_frames: `[B]` valid frames per clip (`frames_of(lengths)`), on any device; values above T are clipped.
        crop_frames: crop length in frames (608 in stage 1, 1001 in stage 2).
        generator: the random starts are drawn on the generator's device (CPU or the log-mel's device) and then
            moved to `log_mel.device`. A CPU generator (the default when None is passed is torch's global CPU
            generator) gives the same crops on every device; prefer it.
        return_starts: also return the drawn starts `[B]` int64 (on `log_mel.device`).

    Returns:
        `[B, F, crop_frames]` (and the starts if asked).
    """
    if log_mel.ndim != 3:
        raise ValueError(f"log_mel must be [batch, freq, frames], got {tuple(log_mel.shape)}")
    if crop_frames < 1:
        raise ValueError(f"crop_frames must be positive, got {crop_frames}")
    batch, freq, total = log_mel.shape
    if total == 0:
        raise ValueError("log_mel has no frames")
    device = log_mel.device
    num_frames = torch.as_tensor(num_frames, device=device).to(torch.int64).clamp(0, total)
    if num_frames.shape != (batch,):
        raise ValueError(f"num_frames must have shape [{batch}], got {tuple(num_frames.shape)}")
    max_start = (num_frames - crop_frames).clamp(min=0)
    draw_device = generator.device if generator is not None else torch.device("cpu")
    uniform = torch.rand(batch, generator=generator, dtype=torch.float64, device=draw_device).to(device)
    starts = torch.minimum((uniform * (max_start + 1).to(torch.float64)).floor().to(torch.int64), max_start)
    index = starts[:, None] + torch.arange(crop_frames, device=device)[None, :]  # [B, C]
    valid = index < num_frames[:, None]
    gathered = log_mel.gather(2, index.clamp(max=total - 1)[:, None, :].expand(batch, freq, crop_frames))
    crops = gathered.masked_fill(~valid[:, None, :], 0.0)
    return (crops, starts) if return_starts else crops
