"""Text-queried sound-event timeline: how well each text query matches the audio over time.

Windows of the recording (`window_seconds` long, every `hop_seconds`) go through the CLAP audio path in batches;
each window's embedding is compared with each query's text embedding (cosine). The result can be written as CSV and
JSON and plotted as a PNG (waveform and log-mel above, one similarity line per query below).
"""

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .extras import require_extra
from .long_audio import AudioFileSamples
from .modeling_m2d2 import M2D2ClapModel


@dataclass
class Timeline:
    """Similarities [queries, windows] between each query and each window, and the windows' centre times (s)."""

    queries: list[str]
    times: np.ndarray
    similarities: np.ndarray
    window_seconds: float
    hop_seconds: float

    def to_dict(self) -> dict:
        return {
            "queries": self.queries,
            "window_seconds": self.window_seconds,
            "hop_seconds": self.hop_seconds,
            "times": self.times.tolist(),
            "similarities": {query: row.tolist() for query, row in zip(self.queries, self.similarities)},
        }

    def save(self, path_without_suffix: str | Path) -> tuple[Path, Path]:
        """Writes `<path>.csv` (one row per window: time, one column per query) and `<path>.json`."""
        base = Path(path_without_suffix)
        base.parent.mkdir(parents=True, exist_ok=True)
        with open(base.with_suffix(".csv"), "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["time_s", *self.queries])
            for index, time in enumerate(self.times):
                writer.writerow([f"{time:.3f}", *(f"{value:.6f}" for value in self.similarities[:, index])])
        base.with_suffix(".json").write_text(json.dumps(self.to_dict(), indent=2))
        return base.with_suffix(".csv"), base.with_suffix(".json")


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """First samples of the windows over a recording of `num_samples` (window and hop in samples): one every `hop`,
    plus one that ends at the recording's end when the hops miss the tail. A recording shorter than one window is
    one window (of its whole length: callers clip `window` to `num_samples`)."""
    starts = list(range(0, max(num_samples - window, 0) + 1, hop))
    if starts[-1] + window < num_samples:
        starts.append(num_samples - window)  # cover the tail
    return starts


Waveform = np.ndarray | str | os.PathLike | AudioFileSamples


@torch.no_grad()
def window_embeddings(
    model: M2D2ClapModel,
    processor,
    waveform: Waveform,
    window_seconds: float = 2.0,
    hop_seconds: float = 0.5,
    batch_size: int = 16,
) -> tuple[np.ndarray, int, torch.Tensor]:
    """CLAP audio embeddings of the windows of `waveform`, `batch_size` windows per forward, so memory holds the
    waveform and one batch of windows whatever the length. `waveform` is mono audio at the processor's sampling
    rate, or an audio file (a path or an `AudioFileSamples`), which is read a batch of windows at a time: then not
    even the waveform is held.

    Returns (window start samples, window length in samples, L2-normalised embeddings [windows, projection_dim])."""
    if window_seconds <= 0 or hop_seconds <= 0:
        raise ValueError(f"window ({window_seconds} s) and hop ({hop_seconds} s) must be positive")
    rate = processor.feature_extractor.sampling_rate
    if isinstance(waveform, (str, os.PathLike)):
        with AudioFileSamples(waveform, rate) as samples:
            return window_embeddings(model, processor, samples, window_seconds, hop_seconds, batch_size)
    if isinstance(waveform, AudioFileSamples):
        if waveform.sampling_rate != rate:
            raise ValueError(f"the file is read at {waveform.sampling_rate} Hz, the processor takes {rate} Hz")
        num_samples = waveform.num_samples

        def cut(start: int, stop: int) -> np.ndarray:
            return waveform.read(start, stop).numpy()

    else:
        wave = np.asarray(waveform, dtype=np.float32)
        if wave.ndim != 1:
            raise ValueError(f"window embeddings take mono audio [samples], got shape {wave.shape}")
        num_samples = len(wave)

        def cut(start: int, stop: int) -> np.ndarray:
            return wave[start:stop]

    window, hop = int(round(window_seconds * rate)), int(round(hop_seconds * rate))
    window = min(window, num_samples)
    starts = window_starts(num_samples, window, hop)
    device = next(model.parameters()).device
    audio_rows = []
    for first in range(0, len(starts), batch_size):
        clips = np.stack([cut(start, start + window) for start in starts[first : first + batch_size]])
        inputs = processor(audio=clips, sampling_rate=rate, return_tensors="pt").to(device)
        audio_rows.append(model.get_audio_features(**inputs).pooler_output)
    return np.asarray(starts), window, torch.cat(audio_rows)


@torch.no_grad()
def sound_event_timeline(
    model: M2D2ClapModel,
    processor,
    waveform: Waveform,
    queries: list[str],
    window_seconds: float = 2.0,
    hop_seconds: float = 0.5,
    batch_size: int = 16,
) -> Timeline:
    """Similarity of every query to every window of `waveform` (mono, at the processor's sampling rate, or an audio
    file read a batch of windows at a time, as `window_embeddings` takes it).

    A recording shorter than one window is one window. The last window ends at the recording's end."""
    if not queries:
        raise ValueError("sound_event_timeline needs at least one text query")
    if window_seconds <= 0 or hop_seconds <= 0:
        raise ValueError(f"window ({window_seconds} s) and hop ({hop_seconds} s) must be positive")
    rate = processor.feature_extractor.sampling_rate
    device = next(model.parameters()).device
    text_inputs = processor(text=queries, return_tensors="pt").to(device)
    text = model.get_text_features(**text_inputs).pooler_output
    starts, window, audio = window_embeddings(model, processor, waveform, window_seconds, hop_seconds, batch_size)
    similarities = (audio @ text.t()).t().float().cpu().numpy()
    times = (starts + window / 2) / rate
    hop = int(round(hop_seconds * rate))
    return Timeline(list(queries), times, similarities, window / rate, hop / rate)


def plot_timeline(
    timeline: Timeline, waveform: np.ndarray, sampling_rate: int, path: str | Path, title: str = ""
) -> Path:
    """A PNG: the waveform, its log-mel, and one similarity line per query over time."""
    require_extra("timeline")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .feature_extraction_m2d2 import M2D2FeatureExtractor

    wave = np.asarray(waveform, dtype=np.float32)
    duration = len(wave) / sampling_rate
    extractor = M2D2FeatureExtractor(sampling_rate=sampling_rate)
    log_mel = extractor.log_mel(torch.from_numpy(wave)[None])[0].numpy()
    figure, axes = plt.subplots(3, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [1, 1.4, 2.2]})
    axes[0].plot(np.arange(len(wave)) / sampling_rate, wave, linewidth=0.4, color="0.3")
    axes[0].set_ylabel("waveform")
    axes[1].imshow(log_mel, origin="lower", aspect="auto", extent=(0, duration, 0, log_mel.shape[0]), cmap="magma")
    axes[1].set_ylabel("mel bin")
    for query, row in zip(timeline.queries, timeline.similarities):
        axes[2].plot(timeline.times, row, marker="o", markersize=2, label=query)
    axes[2].set_ylabel("cosine similarity")
    axes[2].set_xlabel("time (s)")
    axes[2].legend(loc="upper right", fontsize=8, ncol=max(1, math.ceil(len(timeline.queries) / 6)))
    axes[2].set_xlim(0, duration)
    if title:
        axes[0].set_title(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
