"""`build_index`: embed a sound collection into an index folder, resumably, in one or many processes.

Work happens in `.<INDEX_DIR>.partial/` beside the output: every process embeds its share of the sounds still to do
(`items[rank::world]`, one `accelerate` process per GPU or machine, or one plain process) and writes Parquet shards
of a few files each, each shard atomically (temporary name, then rename). A run that is interrupted leaves complete
shards; the next run with the same model and settings skips every sound they hold whose stamp (size and mtime) is
unchanged, and embeds the changed and new ones. When all processes are done, the main process merges the shards
(the newest rows of each sound, only for sounds still in the source), builds the FAISS index, writes the folder
under a temporary name and renames it to INDEX_DIR: the index folder appears whole or not at all. An existing index
of the same model and settings is itself read as a shard, so re-indexing a grown collection embeds only what is new.

Index folder:
    index.json       model fingerprint, settings, counts, FAISS type / parameters / recall@10, failed sounds
    items.parquet    one row per vector: key, stamp, path, kind ("clip" or "window"), start, end, duration, embedding;
                     its schema metadata holds the model (name, config and weights hashes) and window / hop / rate
    vectors.faiss    the FAISS index over the embeddings, row i = items row i
    README.md        what the folder holds and how to search it
"""

import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Callable
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
from .sources import SourceItem, list_source
from .vector_index import (
    INDEX_TYPES,
    build_vector_index,
    check_overrides,
    recall_at_k,
    resolved_params,
    write_vector_index,
)


FORMAT = "m2d2-hf-sound-index"
FORMAT_VERSION = 1
ITEMS_FILE, VECTORS_FILE, META_FILE, README_FILE = "items.parquet", "vectors.faiss", "index.json", "README.md"
SETTINGS_FILE = "settings.json"
PARQUET_MODEL_KEY, PARQUET_SETTINGS_KEY = b"m2d2_hf.model", b"m2d2_hf.settings"
META_COLUMNS = ("key", "stamp", "path", "kind", "start", "end", "duration")
# Local files longer than this are read a window at a time rather than decoded whole: below it the waveform (38 MB
# for 10 minutes at 16 kHz) is small next to the model, and one read of the whole file is the simplest.
STREAMED_FILE_SECONDS = 600.0


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
    seconds: float = 0.0
    recall_at_10: float | None = None


def _schema(dim: int):
    import pyarrow as pa

    # The schema as a table: field, type (fmt: skip keeps the rows).
    return pa.schema(
        [("key", pa.string()), ("stamp", pa.string()), ("path", pa.string()), ("kind", pa.string()),
         ("start", pa.float64()), ("end", pa.float64()), ("duration", pa.float64()),
         ("embedding", pa.list_(pa.float32(), dim))]
    )  # fmt: skip


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    write(str(temporary))
    os.replace(temporary, path)


class _ShardWriter:
    """Rows and failures of the sounds one process embeds, written every `files_per_shard` sounds."""

    def __init__(self, folder: Path, rank: int, dim: int, files_per_shard: int):
        self.folder, self.rank, self.dim, self.files_per_shard = folder, rank, dim, files_per_shard
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
        import pyarrow.parquet as pq

        # Time-ordered names: when shards disagree about a sound, the newest wins at the merge.
        name = f"{time.time_ns():020d}-r{self.rank:04d}"
        table = pa.Table.from_pylist(self.rows, schema=_schema(self.dim))
        failed = json.dumps(self.failed)
        # The failure list first: a shard counts as done once its Parquet file exists.
        _atomic_write(self.folder / f"{name}.failed.json", lambda p: Path(p).write_text(failed))
        _atomic_write(self.folder / f"{name}.parquet", lambda p: pq.write_table(table, p))
        self.rows, self.failed, self.files = [], [], 0


def _shard_files(folder: Path, previous_index: Path | None) -> list[Path]:
    """Parquet shards oldest first; a previous complete index counts as the oldest."""
    shards = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    if previous_index is not None:
        shards.insert(0, previous_index / ITEMS_FILE)
    return shards


def _failures_of(shard: Path) -> list[dict]:
    if shard.name == ITEMS_FILE:
        return json.loads((shard.parent / META_FILE).read_text())["failed"]
    sidecar = shard.with_name(shard.name[: -len(".parquet")] + ".failed.json")
    return json.loads(sidecar.read_text()) if sidecar.is_file() else []


def _done(shards: list[Path]) -> dict[str, str]:
    """key → stamp of every sound embedded or failed in `shards` (newest shard wins)."""
    import pyarrow.parquet as pq

    done: dict[str, str] = {}
    for shard in shards:
        table = pq.read_table(shard, columns=["key", "stamp"])
        done.update(zip(table.column("key").to_pylist(), table.column("stamp").to_pylist()))
        done.update((failure["key"], failure["stamp"]) for failure in _failures_of(shard))
    return done


def _merge(shards: list[Path], items: list[SourceItem]) -> tuple[Any, list[dict]]:
    """The rows of the current sounds (each from the newest shard holding it with its current stamp) in source
    order, and the current failures."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    current = {item.key: item.stamp for item in items}
    order = {item.key: position for position, item in enumerate(items)}
    newest: dict[str, int] = {}
    failed: dict[str, dict] = {}
    tables = []
    for number, shard in enumerate(shards):
        table = pq.read_table(shard)
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
    return table.drop_columns(["_order", "_kind"]), failures


def embeddings_of(table) -> np.ndarray:
    """The `embedding` column of an items table as a float32 [rows, D] array."""
    column = table.column("embedding").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1).astype(np.float32, copy=False)


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


def _write_index(
    output: Path, table, failures: list[dict], meta: dict, index_type: str, params: dict | None
) -> float | None:
    import pyarrow.parquet as pq

    vectors = embeddings_of(table)
    if not len(vectors):
        raise ValueError("no sound of the source could be decoded: nothing to index (see the failures above)")
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
    temporary = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    temporary.mkdir(parents=True)
    try:
        # The Parquet file names its model too, so that it stays identifiable when copied out of the folder.
        described = table.replace_schema_metadata(
            {PARQUET_MODEL_KEY: json.dumps(meta["model"]), PARQUET_SETTINGS_KEY: json.dumps(_window_settings(meta))}
        )
        pq.write_table(described, temporary / ITEMS_FILE)
        write_vector_index(index, str(temporary / VECTORS_FILE))
        (temporary / META_FILE).write_text(json.dumps(meta, indent=2))
        (temporary / README_FILE).write_text(_readme(meta))
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
    items = list_source(source, split=split, audio_column=audio_column)
    model, processor = load_clap_model(model_name, state.device)
    rate = processor.feature_extractor.sampling_rate
    # A local folder is recorded by its absolute path, so that the index finds its model from any directory.
    name = str(Path(model_name).resolve()) if Path(model_name).is_dir() else str(model_name)
    settings = _settings(model_fingerprint(model, name), window_seconds, hop_seconds, rate)

    work = output.with_name(f".{output.name}.partial")
    if work.is_dir() and (work / SETTINGS_FILE).is_file():
        if not _same_settings(json.loads((work / SETTINGS_FILE).read_text()), settings):
            raise ValueError(
                f"{work} holds an interrupted run with another model or window / hop: delete it to start over, or "
                "rerun with the same model and settings to resume it"
            )
    state.wait_for_everyone()
    if state.is_main_process:
        work.mkdir(parents=True, exist_ok=True)
        _atomic_write(work / SETTINGS_FILE, lambda p: Path(p).write_text(json.dumps(settings)))
    state.wait_for_everyone()
    previous = None
    if (output / META_FILE).is_file() and _same_settings(json.loads((output / META_FILE).read_text()), settings):
        previous = output
    done = _done(_shard_files(work, previous))
    todo = [item for item in items if done.get(item.key) != item.stamp]
    say(
        f"{len(items)} sounds: {len(items) - len(todo)} already indexed, {len(todo)} to embed"
        + (f" in {state.num_processes} processes" if state.num_processes > 1 else "")
    )

    writer = _ShardWriter(work, state.process_index, model.config.projection_dim, files_per_shard)
    window_samples = int(round(window_seconds * rate))
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
                    spans = [("clip", 0.0, duration)] + [("window", float(s), float(e)) for s, e in zip(starts, ends)]
                    writer.add(item, spans, duration, np.concatenate([clip[None], windows]))
                    continue
                try:
                    waves.append(decode_audio(value, sampling_rate=rate, max_seconds=None))
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
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **settings,
        "source": str(source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    # How to open the source again (the page plays dataset rows from it): an in-memory dataset cannot be.
    if isinstance(source, (str, os.PathLike)):
        local = Path(source).exists()
        where = str(Path(source).resolve()) if local else str(source)
        meta["reopen"] = {"source": where, "split": split, "audio_column": audio_column}
    recall = _write_index(output, table, failures, meta, index_type, index_params)
    shutil.rmtree(work)
    if recall is not None:
        say(f"{index_type} index recall@10 against exact search: {recall:.4f}")
    for failure in failures:
        say(f"failed: {failure['key']}: {failure['error']}")
    return IndexSummary(
        output=output,
        num_files=meta["num_files"],
        num_vectors=meta["num_vectors"],
        audio_seconds=meta["audio_hours"] * 3600,
        embedded_files=len(todo),
        reused_files=len(items) - len(todo),
        failed=failures,
        seconds=time.perf_counter() - started,
        recall_at_10=recall,
    )


__all__ = ["FORMAT", "IndexSummary", "build_index", "embeddings_of"]
