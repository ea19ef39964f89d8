"""Audio streams for training: `datasets` streaming in, padded waveform batches out.

The pipeline has three parts, split by where they run:

1. `load_audio_stream` (DataLoader workers): a `datasets.IterableDataset` over a local audiofolder, Parquet shards,
   WebDataset tars, a CSV/JSONL list of audio paths or a hub dataset, always streamed. Each example is decoded with
   soundfile (torchcodec as the fallback, e.g. for m4a), averaged to mono, resampled with torchaudio and cut to its
   first `max_seconds`. A broken item never raises: it comes out with an empty `audio` and a short `error`.
2. `AudioBatchCollator` (DataLoader workers too, but its counts travel in the batch): drops and counts the broken
   items (and, given the feature extractor's `max_peak`, those too loud for finite log-mel features), zero-pads the
   rest into `[B, L]`, optionally draws one cached caption embedding per clip.
3. `random_log_mel_crops` (training device): after the batch log-mel (`M2D2FeatureExtractor.log_mel`), a random
   fixed-length crop per clip, zero-padded at the end in raw log-mel space, as the original's training crops.

Sharding: `datasets.distributed.split_dataset_by_node` gives each process whole shards when the shard count is a
multiple of the number of processes (otherwise every process reads everything and keeps every n-th example), and
the DataLoader's workers then split a process's shards among themselves. Write Parquet/WebDataset corpora with a
shard count that is a multiple of processes x workers. A local audiofolder is cut into `num_shards` shards here (the
`audiofolder` builder would make one shard per metadata file, i.e. one decoding worker).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..data.audio import AUDIO_EXTENSIONS, AudioDecodeError, audio_path, decode_audio
from ..data.sources import (
    cast_audio_undecoded,
    file_stem,
    load_saved_dataset,
    read_table,
    resolve_path,
    source_kind,
)


logger = logging.getLogger(__name__)

# Columns that `load_audio_stream` always produces.
ID_KEY, AUDIO_KEY, ERROR_KEY = "id", "audio", "error"
# WebDataset bookkeeping columns of the `webdataset` builder.
_WDS_KEY, _WDS_URL = "__key__", "__url__"
_MAX_ERROR_CHARS = 200


# ----------------------------------------------------------------------------------------------------------------
# Decoding (in the DataLoader workers, with `m2d2_hf.data.audio.decode_audio`)
# ----------------------------------------------------------------------------------------------------------------


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
            clip_id = file_stem(audio_path(cell))
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


def _table_rows(tables: list) -> Iterable[dict]:
    """Generator of `IterableDataset.from_generator`: one list element (a table slice and its base folder) per
    shard."""
    for table, base, path_column in tables:
        for row in table.to_pylist():
            path = resolve_path(base, row.pop(path_column, None))
            row[AUDIO_KEY] = None if path is None else {"bytes": None, "path": path}
            yield row


def _path_list_stream(
    table_files: Sequence[tuple[str, str]], path_column: str, id_column: str | None, num_shards: int
):
    """Stream of rows from metadata / list files (each with the folder its relative paths start from)."""
    import datasets

    slices = []
    for path, base in table_files:
        table = read_table(path, string_columns=[c for c in (path_column, id_column) if c])
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


def _files_source(files: Sequence[str], kind: str, split: str):
    import datasets

    return datasets.load_dataset(kind, data_files={split: list(files)}, split=split, streaming=True)


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

    source = source_kind(train_data, split)
    kind = source.kind
    if kind == "audiofolder":  # relative `file_name` paths in a metadata file
        dataset = _path_list_stream([(source.metadata, source.base)], "file_name", id_column, num_shards)
    elif kind == "table":  # CSV / JSONL lists of audio paths in `audio_column`
        tables = [(f, os.path.dirname(os.path.abspath(f))) for f in source.files]
        dataset = _path_list_stream(tables, audio_column, id_column, num_shards)
    elif kind == "saved_dataset":
        dataset = cast_audio_undecoded(load_saved_dataset(source.path, split), audio_column)
        dataset = dataset.to_iterable_dataset(num_shards=max(1, min(num_shards, len(dataset))))
    elif kind in ("parquet", "webdataset"):
        dataset = _files_source(source.files, kind, split)
    elif kind == "audio_files":  # every audio file below the folder (no split-name inference by datasets)
        patterns = [f"**/*.{ext}" for ext in AUDIO_EXTENSIONS] + [f"**/*.{ext.upper()}" for ext in AUDIO_EXTENSIONS]
        dataset = datasets.load_dataset(
            "audiofolder", data_dir=source.path, data_files={split: patterns}, split=split, streaming=True
        )
    else:
        dataset = datasets.load_dataset(
            source.path, dataset_config, split=split, streaming=True, **(load_kwargs or {})
        )
    if kind in ("audiofolder", "table"):
        path_column = AUDIO_KEY  # the rows carry their resolved paths as an audio struct

    dataset = cast_audio_undecoded(dataset, audio_column)
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
        - `ids` list of str, `num_skipped` int (items dropped for an `error`, empty audio or a peak above
          `max_peak`; sum it over batches and gather it across processes for the run's count),
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
        max_peak: drop clips whose largest sample magnitude exceeds it: `M2D2FeatureExtractor.max_peak`, above which
            the log-mel overflows float32 into Inf/NaN (one such clip makes the batch's loss, the run's
            `norm_stats` and then every weight NaN). None: no limit.
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
        max_peak: float | None = None,
        max_warnings: int = 20,
        warn_every: int = 1000,
    ):
        self.caption_table = caption_table
        self.seed = int(seed)
        self.min_samples = int(min_samples)
        self.keep_columns = list(keep_columns)
        self.max_peak = max_peak
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

    def _problem(self, example: dict) -> str:
        """Why an example cannot be trained on ("" when it can)."""
        audio = example.get(AUDIO_KEY)
        error = example.get(ERROR_KEY) or ""
        if error or audio is None or np.size(audio) == 0:
            return error or "empty audio"
        if self.max_peak is not None:
            samples = np.asarray(audio)
            peak = max(float(samples.max()), -float(samples.min()))
            if peak > self.max_peak:
                return (
                    f"peaks at {peak:g}, too loud for float32 spectra (its log-mel would be Inf/NaN above "
                    f"{self.max_peak:.3g}; audio is expected in [-1, 1])"
                )
        return ""

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        kept, num_skipped = [], 0
        for example in examples:
            problem = self._problem(example)
            if problem:
                num_skipped += 1
                self._warn_skipped(str(example.get(ID_KEY)), problem)
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
