"""Inputs of the evaluations: evaluation sets, audio decoding, labels, embeddings (the plumbing the example scripts
share, arguments, model loading, JSON reports and tables, is in `m2d2_hf.evaluation.cli`).

An evaluation set is either a local audiofolder-style folder (a `metadata.csv` whose `file_name` column holds paths
relative to the folder, other columns as labels, captions, splits) or a `datasets` dataset / hub id with an audio
column. Audio is decoded lazily by the data layer (`m2d2_hf.data.audio.decode_audio`, as the `m2d2-hf` command line
and the training streams decode it), averaged to mono and resampled to the feature extractor's rate, so a set never
sits in memory as waveforms; labels are read with `m2d2_hf.data.labels`.
"""

import sys
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets import ClassLabel, List
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..data.audio import decode_audio
from ..data.sources import cast_audio_undecoded, choose_split, find_metadata, metadata_rows


# A clip as the evaluations accept it: a file path; a `datasets` audio value (undecoded {"bytes", "path"}, decoded
# {"array", "sampling_rate"}, or the torchcodec `AudioDecoder` of datasets ≥ 4); or a float array / tensor
# ([samples] or [channels, samples]) already at the feature extractor's rate.
AudioSource = Any

EMBEDDING_LEVELS = ("clap", "frame_mean")
VALID_SPLITS = ("valid", "validation", "val")


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation sets
# ---------------------------------------------------------------------------------------------------------------------


class _DatasetColumn(Sequence):
    """Lazy read access to one column of a `datasets.Dataset` (a whole audio column would be loaded into memory)."""

    def __init__(self, dataset, column: str):
        self.dataset = dataset
        self.column = column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[int(index)][self.column]


class EvaluationSet:
    """Clips and their metadata rows; audio is decoded on access.

    Attributes:
        rows: one dict of metadata (every column but the audio) per clip.
    """

    def __init__(self, audio: Sequence[AudioSource], rows: list[dict], index: Sequence[int] | None = None):
        if len(audio) != len(rows):
            raise ValueError(f"{len(audio)} clips but {len(rows)} metadata rows")
        self._audio = audio
        self._all_rows = rows
        self._index = list(range(len(rows))) if index is None else list(index)
        self.rows = [rows[i] for i in self._index]

    def __len__(self) -> int:
        return len(self._index)

    def audio(self, position: int) -> AudioSource:
        """The undecoded audio of clip `position` (decode with `m2d2_hf.data.audio.decode_audio`)."""
        return self._audio[self._index[position]]

    def audio_sources(self) -> "_AudioSources":
        """All clips' undecoded audio, in order, as a sized iterable (for `embed_audio`)."""
        return _AudioSources(self)

    def column(self, name: str) -> list:
        if self.rows and name not in self.rows[0]:
            raise KeyError(f"no column {name!r}; the set has {sorted(self.rows[0])}")
        return [row[name] for row in self.rows]

    def select(self, positions: Iterable[int]) -> "EvaluationSet":
        """The clips at `positions` (in that order)."""
        return EvaluationSet(self._audio, self._all_rows, [self._index[p] for p in positions])

    def where(self, column: str, value: Any) -> "EvaluationSet":
        """The clips whose `column` equals `value`."""
        return self.select([p for p, v in enumerate(self.column(column)) if v == value])

    @classmethod
    def from_folder(cls, folder: str | Path) -> "EvaluationSet":
        """An audiofolder-style folder: a `metadata.csv` (`.jsonl`, `.parquet`) with a `file_name` column relative
        to the folder; CSV cells stay strings."""
        folder = Path(folder)
        metadata = find_metadata(folder)
        if metadata is None:
            raise FileNotFoundError(f"{folder} has no metadata file (metadata.csv, .jsonl or .parquet)")
        rows, _ = metadata_rows(metadata, ("file_name",), all_strings=True)
        return cls([folder / row["file_name"] for row in rows], rows)

    @classmethod
    def from_dataset(cls, dataset, audio_column: str = "audio") -> "EvaluationSet":
        """A `datasets.Dataset`. Its audio is read undecoded and decoded with soundfile; `ClassLabel` columns (also
        inside lists) are turned into their names."""
        if audio_column not in dataset.column_names:
            raise KeyError(f"no audio column {audio_column!r}; the dataset has {dataset.column_names}")
        dataset = cast_audio_undecoded(dataset, audio_column)
        rows = dataset.remove_columns([audio_column]).to_list()
        for name, feature in dataset.features.items():
            if isinstance(feature, ClassLabel):
                for row in rows:
                    row[name] = feature.int2str(row[name])
            elif isinstance(feature, List) and isinstance(feature.feature, ClassLabel):
                for row in rows:
                    row[name] = [feature.feature.int2str(value) for value in row[name]]
        return cls(_DatasetColumn(dataset, audio_column), rows)


class _AudioSources:
    def __init__(self, evaluation_set: EvaluationSet):
        self.evaluation_set = evaluation_set

    def __len__(self) -> int:
        return len(self.evaluation_set)

    def __iter__(self) -> Iterator[AudioSource]:
        return (self.evaluation_set.audio(p) for p in range(len(self.evaluation_set)))


def load_evaluation_set(
    source,
    split: str | None = None,
    split_column: str = "split",
    audio_column: str = "audio",
    limit: int | None = None,
) -> EvaluationSet:
    """Loads an evaluation set.

    Args:
        source: a folder with `metadata.csv`; a `datasets.Dataset` or `DatasetDict` (for builders that need
            arguments, e.g. `load_dataset("audiofolder", data_dir=...)`, pass the loaded dataset); or a hub id or
            local dataset folder, given to `datasets.load_dataset` as its path.
        split: a split of the dataset when it has one of that name; otherwise the rows whose `split_column` equals
            it (an audiofolder keeps all rows in one "train" split and the real split in a column).
        audio_column: the audio column of a `datasets` source.
        limit: keep only the first `limit` clips (after the split is chosen), for quick runs.
    """
    if isinstance(source, (str, Path)) and Path(source).is_dir() and find_metadata(source) is not None:
        evaluation_set, split_done = EvaluationSet.from_folder(source), False
    else:
        if isinstance(source, (str, Path)):
            chosen = choose_split(datasets.get_dataset_split_names(str(source)), split)
            source, split_done = datasets.load_dataset(str(source), split=chosen), split == chosen
        elif isinstance(source, datasets.DatasetDict):
            chosen = choose_split(list(source), split)
            source, split_done = source[chosen], split == chosen
        else:
            split_done = False
        evaluation_set = EvaluationSet.from_dataset(source, audio_column)
    if split is not None and not split_done:
        evaluation_set = evaluation_set.where(split_column, split)
        if not len(evaluation_set):
            raise ValueError(f"no clip has {split_column} == {split!r}")
    if limit is not None:
        evaluation_set = evaluation_set.select(range(min(limit, len(evaluation_set))))
    return evaluation_set


def unzip_lazily(pairs: Iterable[tuple[AudioSource, Any]]) -> tuple[Iterator[AudioSource], list]:
    """Splits (audio, value) pairs into the audio, as an iterator, and the list of values, which fills while the
    audio is consumed: the pairs are read once and their audio never held in memory."""
    values: list = []

    def audio() -> Iterator[AudioSource]:
        for clip, value in pairs:
            values.append(value)
            yield clip

    return audio(), values


def caption_groups(
    evaluation_set: EvaluationSet, caption_columns: Sequence[str]
) -> list[tuple[AudioSource, list[str]]]:
    """(audio, captions) per clip for retrieval. Each caption column holds a string or a list of strings; rows that
    share an audio file (one row per caption, as in Clotho's or AudioCaps' CSVs) are merged into one clip."""
    groups: dict[Any, tuple[AudioSource, list[str]]] = {}
    for position, row in enumerate(evaluation_set.rows):
        audio = evaluation_set.audio(position)
        path = audio.get("path") if isinstance(audio, dict) else audio if isinstance(audio, (str, Path)) else None
        key = str(Path(path).resolve()) if path is not None else ("row", position)
        captions = groups.setdefault(key, (audio, []))[1]
        for column in caption_columns:
            value = row[column]
            captions.extend([value] if isinstance(value, str) else list(value))
    return list(groups.values())


# ---------------------------------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------------------------------


def prepare_model(model: PreTrainedModel, device: str | torch.device | None) -> torch.device:
    """Puts the model in eval mode, on `device` if one is given; returns the device it runs on."""
    model.eval()
    if device is not None:
        model.to(device)
    return model.device


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def _progress(items: Iterable, description: str, enabled: bool) -> tqdm:
    """A progress bar on stderr (hidden when stderr is not a terminal, or when `enabled` is false)."""
    total = len(items) if hasattr(items, "__len__") else None
    return tqdm(total=total, desc=description, unit="clip", file=sys.stderr, disable=None if enabled else True)


def embed_audio(
    model: PreTrainedModel,
    feature_extractor,
    clips: Iterable[AudioSource],
    level: str = "clap",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Clip embeddings [N, D] (float32, CPU) of `clips`, decoded one batch at a time.

    Args:
        model: an `M2D2ClapModel`, or an `M2D2AudioModel` for `level="frame_mean"`.
        feature_extractor: the model's `M2D2FeatureExtractor` (or a processor holding one).
        level: `"clap"`, the L2-normalised CLAP audio embedding (all tokens of all chunks into the projector, as the
            original zero-shot and retrieval evaluations); `"frame_mean"`, the encoder's `pooler_output`, the mean of
            the frame features (3840-d for ViT-Base, EVAR's linear-evaluation embedding).

    Whole clips are encoded (long ones in independent chunks, as the original). Clips shorter than the model's
    minimum (one patch, 0.15 s) are zero-padded at the end up to it, instead of failing the whole set; EVAR likewise
    zero-pads short clips to the task's clip length.
    """
    if level not in EMBEDDING_LEVELS:
        raise ValueError(f"level must be one of {EMBEDDING_LEVELS}, got {level!r}")
    is_clap = hasattr(model, "get_audio_features")
    if level == "clap" and not is_clap:
        raise ValueError("the CLAP embedding needs an M2D2ClapModel; this model is an audio encoder only")
    feature_extractor = getattr(feature_extractor, "feature_extractor", feature_extractor)
    device = prepare_model(model, device)
    rate, shortest = feature_extractor.sampling_rate, feature_extractor.min_samples
    embeddings = []
    with _progress(clips, f"audio ({level})", progress) as bar:
        for batch in _batched(clips, batch_size):
            waveforms = []
            for clip in batch:
                waveform = decode_audio(clip, rate)
                waveforms.append(np.pad(waveform, (0, max(0, shortest - len(waveform)))))
            features = feature_extractor(waveforms, sampling_rate=rate, return_tensors="pt").to(device)
            with torch.inference_mode():
                if level == "clap":
                    embedding = model.get_audio_features(**features).pooler_output
                else:
                    embedding = (model.audio_model if is_clap else model)(**features).pooler_output
            embeddings.append(embedding.float().cpu())
            bar.update(len(batch))
    if not embeddings:
        raise ValueError("no audio to embed")
    return torch.cat(embeddings)


def embed_texts(
    model: PreTrainedModel,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """L2-normalised CLAP text embeddings [N, D] (float32, CPU).

    `batch_size=1` (the default) encodes each text alone, as the original evaluation does: with more, texts are
    padded to the longest of their batch, which changes the embeddings by float rounding (masked attention still
    ignores the padding). The tokenizer does not truncate, as the original (texts over 512 tokens raise).
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    device = prepare_model(model, device)
    embeddings = []
    with _progress(texts, "text", progress) as bar:
        for batch in _batched(texts, batch_size):
            tokens = tokenizer(list(batch), padding=True, return_tensors="pt").to(device)
            with torch.inference_mode():
                embeddings.append(model.get_text_features(**tokens).pooler_output.float().cpu())
            bar.update(len(batch))
    return torch.cat(embeddings)


__all__ = [
    "EMBEDDING_LEVELS",
    "EvaluationSet",
    "caption_groups",
    "embed_audio",
    "embed_texts",
    "load_evaluation_set",
    "prepare_model",
    "unzip_lazily",
]
