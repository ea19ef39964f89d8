"""Tests of the training audio streams (`m2d2_hf.training.data`): sources, sharding, broken items, crops, captions
(the decoder itself: tests/test_data_audio.py)."""

import csv
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile
import torch
import torchaudio

from m2d2_hf.feature_extraction_m2d2 import M2D2FeatureExtractor
from m2d2_hf.training.captions import CaptionEmbeddingTable, draw_captions, write_embedding_shard
from m2d2_hf.training.data import (
    AudioBatchCollator,
    frames_of,
    load_audio_stream,
    random_log_mel_crops,
)


@pytest.fixture(autouse=True)
def _no_thread_shutdown_sleep(monkeypatch):
    """datasets sleeps 5 s after a shuffled Parquet stream ends (to let pyarrow threads close); not needed here."""
    import datasets

    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def _stem(name: str) -> str:
    return Path(name).stem


@pytest.fixture(scope="module")
def metadata(real_sounds_dir) -> list[dict]:
    with open(real_sounds_dir / "metadata.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def clips(real_sounds_dir, metadata) -> list[dict]:
    """Eight train clips of different labels: id, path, encoded bytes, decoded float32 samples, caption."""
    chosen, labels = [], set()
    for row in metadata:
        if row["split"] == "train" and row["label"] not in labels and float(row["duration_s"]) < 4:
            labels.add(row["label"])
            path = real_sounds_dir / row["file_name"]
            samples, rate = soundfile.read(path, dtype="float32")
            assert rate == 16000 and samples.ndim == 1
            chosen.append(
                dict(id=_stem(path), path=path, data=path.read_bytes(), samples=samples, caption=row["caption"])
            )
        if len(chosen) == 8:
            break
    return chosen


def _collect(stream) -> dict[str, dict]:
    out = {}
    for example in stream:
        assert example["id"] not in out, f"duplicate id {example['id']}"
        out[example["id"]] = example
    return out


_HF_AUDIO_METADATA = {
    b"huggingface": json.dumps(
        {"info": {"features": {"audio": {"_type": "Audio"}, "caption": {"dtype": "string", "_type": "Value"}}}}
    ).encode()
}


def _write_audio_struct_parquet(path: Path, clips: list[dict]) -> None:
    """A Parquet shard as datasets writes it: an Audio feature stored as struct {bytes, path}."""
    audio = pa.array(
        [{"bytes": c["data"], "path": c["path"].name} for c in clips],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    table = pa.table({"audio": audio, "caption": [c["caption"] for c in clips]})
    pq.write_table(table.replace_schema_metadata(_HF_AUDIO_METADATA), path)


def _write_binary_parquet(path: Path, ids: list[str], blobs: list[bytes]) -> None:
    """A Parquet shard with a raw binary column of encoded audio."""
    pq.write_table(pa.table({"id": ids, "audio": pa.array(blobs, type=pa.binary())}), path)


def _wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype=subtype)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------


def test_audiofolder_stream_yields_train_clips(real_sounds_dir, metadata):
    stream = load_audio_stream(
        real_sounds_dir, filter_fn=lambda row: row["split"] == "train", keep_columns=["caption"], max_seconds=3.0
    )
    examples = _collect(stream)
    train = {_stem(row["file_name"]): row for row in metadata if row["split"] == "train"}
    assert len(train) == 191
    assert set(examples) == set(train)
    for clip_id, example in examples.items():
        assert set(example) == {"id", "audio", "error", "caption"}
        assert example["error"] == ""
        assert example["caption"] == train[clip_id]["caption"]
        audio = example["audio"]
        assert isinstance(audio, np.ndarray) and audio.dtype == np.float32 and audio.ndim == 1
        expected, rate = soundfile.read(real_sounds_dir / train[clip_id]["file_name"], dtype="float32")
        assert rate == 16000
        np.testing.assert_array_equal(audio, expected[:48000])  # 16 kHz mono FLAC, cut at 3 s


def test_parquet_shards_stream_the_same_arrays(tmp_path, clips):
    _write_audio_struct_parquet(tmp_path / "train-00000.parquet", clips[:4])
    _write_audio_struct_parquet(tmp_path / "train-00001.parquet", clips[4:])
    examples = _collect(load_audio_stream(str(tmp_path / "*.parquet"), keep_columns=["caption"]))
    assert set(examples) == {c["id"] for c in clips}  # ids: stems of the struct's paths
    for clip in clips:
        np.testing.assert_array_equal(examples[clip["id"]]["audio"], clip["samples"])
        assert examples[clip["id"]]["caption"] == clip["caption"]

    # A raw binary column with an explicit id column, given as a folder of shards.
    folder = tmp_path / "binary"
    folder.mkdir()
    ids = [f"clip{i}" for i in range(len(clips))]
    _write_binary_parquet(folder / "part-0.parquet", ids, [c["data"] for c in clips])
    examples = _collect(load_audio_stream(folder, id_column="id"))
    for index, clip in enumerate(clips):
        np.testing.assert_array_equal(examples[f"clip{index}"]["audio"], clip["samples"])


def test_webdataset_tar_stream(tmp_path, clips):
    shards = tmp_path / "wds"
    shards.mkdir()
    for shard, part in enumerate((clips[:4], clips[4:])):
        with tarfile.open(shards / f"shard-{shard:04d}.tar", "w") as tar:
            for clip in part:
                for suffix, payload in (
                    ("flac", clip["data"]),
                    ("json", json.dumps({"caption": clip["caption"], "label": "x"}).encode()),
                ):
                    info = tarfile.TarInfo(f"{clip['id']}.{suffix}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    stream = load_audio_stream(shards, keep_columns=["caption"], filter_fn=lambda row: row["label"] == "x")
    examples = _collect(stream)
    assert set(examples) == {c["id"] for c in clips}
    for clip in clips:
        np.testing.assert_array_equal(examples[clip["id"]]["audio"], clip["samples"])
        assert examples[clip["id"]]["caption"] == clip["caption"]  # lifted from the .json member


def test_two_processes_see_disjoint_shards(tmp_path, clips, real_sounds_dir):
    for shard, part in enumerate((clips[:3], clips[3:])):
        _write_audio_struct_parquet(tmp_path / f"train-{shard:05d}.parquet", part)
    files = sorted(str(p) for p in tmp_path.glob("*.parquet"))
    ranks = [
        set(_collect(load_audio_stream(files, process_index=rank, num_processes=2, shuffle_buffer=4, seed=3)))
        for rank in range(2)
    ]
    # Whole shards per rank (2 shards, 2 processes; the shard order is shuffled with the shared seed).
    shard_ids = [{c["id"] for c in clips[:3]}, {c["id"] for c in clips[3:]}]
    assert sorted(ranks, key=len) == sorted(shard_ids, key=len)

    # The local audiofolder is cut into 16 * num_processes shards, split the same way.
    folder_ranks = [
        set(_collect(load_audio_stream(real_sounds_dir, process_index=rank, num_processes=2, max_seconds=0.1)))
        for rank in range(2)
    ]
    assert not folder_ranks[0] & folder_ranks[1]
    assert len(folder_ranks[0] | folder_ranks[1]) == 251
    assert abs(len(folder_ranks[0]) - len(folder_ranks[1])) <= 16


def test_folder_with_44k_stereo_file_is_resampled_to_16k_mono(tmp_path):
    rate, seconds = 44100, 1.5
    t = np.arange(int(rate * seconds)) / rate
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 1000 * t)
    stereo = np.stack([left, right], axis=1).astype(np.float32)
    (tmp_path / "sounds").mkdir()
    soundfile.write(tmp_path / "sounds" / "tone.wav", stereo, rate, subtype="FLOAT")
    (tmp_path / "metadata.csv").write_text("file_name,caption\nsounds/tone.wav,two tones\n")

    (example,) = list(load_audio_stream(tmp_path, keep_columns=["caption"]))
    assert example["id"] == "tone" and example["error"] == "" and example["caption"] == "two tones"
    mono = torch.from_numpy(stereo.mean(axis=1))
    expected = torchaudio.functional.resample(mono, rate, 16000).numpy()
    assert example["audio"].dtype == np.float32 and example["audio"].shape == (24000,)
    np.testing.assert_allclose(example["audio"], expected, atol=1e-6)
    # The content is at the right frequencies after resampling: peaks at 440 Hz and 1000 Hz.
    spectrum = np.abs(np.fft.rfft(example["audio"]))
    frequencies = np.fft.rfftfreq(example["audio"].size, 1 / 16000)
    peaks = sorted(frequencies[np.argsort(spectrum)[-2:]])
    np.testing.assert_allclose(peaks, [440, 1000], atol=1)

    # The same file through a CSV list of audio paths (like the original's file lists).
    (tmp_path / "files.csv").write_text("audio,label\nsounds/tone.wav,tone\n")
    (listed,) = list(load_audio_stream(tmp_path / "files.csv", keep_columns=["label"]))
    assert listed["id"] == "tone" and listed["label"] == "tone"
    np.testing.assert_array_equal(listed["audio"], example["audio"])


def test_broken_items_are_skipped_and_counted(tmp_path, clips, caplog):
    good = clips[:4]
    broken = {
        "corrupt": b"\x00\x01not audio at all" * 50,
        "empty_file": b"",
        "zero_length": _wav_bytes(np.zeros(0, np.float32), 16000),
    }
    ids = [c["id"] for c in good[:2]] + list(broken) + [c["id"] for c in good[2:]]
    blobs = [c["data"] for c in good[:2]] + list(broken.values()) + [c["data"] for c in good[2:]]
    # Two shards, so that two DataLoader workers each read one.
    _write_binary_parquet(tmp_path / "train-0.parquet", ids[:4], blobs[:4])
    _write_binary_parquet(tmp_path / "train-1.parquet", ids[4:], blobs[4:])
    stream = load_audio_stream(sorted(str(p) for p in tmp_path.glob("*.parquet")), id_column="id")

    examples = list(stream)
    assert len(examples) == 7
    assert {e["id"] for e in examples if e["error"]} == set(broken)
    assert all(e["audio"].size == 0 for e in examples if e["error"])

    collator = AudioBatchCollator()
    with caplog.at_level(logging.WARNING, logger="m2d2_hf.training.data"):
        batch = collator(examples)
    assert batch["num_skipped"] == 3
    assert batch["ids"] == [c["id"] for c in good]
    for name in broken:
        assert any(name in record.getMessage() for record in caplog.records)
    longest = max(c["samples"].size for c in good)
    assert batch["waveforms"].shape == (4, longest) and batch["waveforms"].dtype == torch.float32
    for row, clip in enumerate(good):
        n = clip["samples"].size
        assert batch["lengths"][row] == n
        np.testing.assert_array_equal(batch["waveforms"][row, :n].numpy(), clip["samples"])
        assert not batch["waveforms"][row, n:].any()

    # Through a DataLoader with worker processes, the counts travel in the batches.
    loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=AudioBatchCollator())
    batches = list(loader)
    assert sum(b["num_skipped"] for b in batches) == 3
    assert sorted(i for b in batches for i in b["ids"]) == sorted(c["id"] for c in good)

    # A batch whose every item is broken.
    batch = collator([e for e in examples if e["error"]])
    assert batch["waveforms"].shape == (0, 0) and batch["lengths"].shape == (0,)
    assert batch["num_skipped"] == 3 and batch["ids"] == []


def test_items_too_loud_for_the_log_mel_are_skipped_counted_and_named(tmp_path, clips, caplog):
    """A decodable float WAV with samples of 1e30 gives Inf/NaN log-mel: the collator skips it at the feature
    extractor's own `max_peak`, as undecodable items, while a clip just under the limit stays."""
    feature_extractor = M2D2FeatureExtractor()
    limit = feature_extractor.max_peak
    wave = 0.1 * np.sin(np.linspace(0, 2000, 7 * 16000)).astype(np.float32)
    wave[::500] = 1e30
    (tmp_path / "loud.wav").write_bytes(_wav_bytes(wave, 16000, subtype="FLOAT"))
    (tmp_path / "clean.flac").write_bytes(clips[0]["data"])
    examples = _collect(load_audio_stream(tmp_path, shuffle_buffer=0))
    loud = examples["loud"]
    assert not loud["error"] and loud["audio"].max() == np.float32(1e30)  # decodable: only its level is wrong
    assert not torch.isfinite(feature_extractor.log_mel(torch.from_numpy(loud["audio"])[None])).all()
    almost = dict(loud, id="almost", audio=np.full(4000, 0.99 * limit, np.float32))

    collator = AudioBatchCollator(max_peak=limit)
    with caplog.at_level(logging.WARNING, logger="m2d2_hf.training.data"):
        batch = collator([examples["clean"], loud, almost])
    assert batch["num_skipped"] == 1 and batch["ids"] == ["clean", "almost"]
    (message,) = [r.getMessage() for r in caplog.records if "loud" in r.getMessage()]
    assert "Skipping audio item 'loud'" in message and "too loud" in message and "1e+30" in message
    assert torch.isfinite(feature_extractor.log_mel(batch["waveforms"][1:, :4000])).all()
    assert AudioBatchCollator()([loud])["num_skipped"] == 0  # no limit given: nothing is judged


def test_collator_min_samples_pads_with_zeros():
    examples = [
        {"id": "short", "audio": np.ones(500, np.float32), "error": ""},
        {"id": "long", "audio": np.ones(1500, np.float32), "error": ""},
    ]
    batch = AudioBatchCollator(min_samples=1000)(examples)
    assert batch["lengths"].tolist() == [1000, 1500]
    assert batch["waveforms"].shape == (2, 1500)
    assert batch["waveforms"][0, :500].eq(1).all() and not batch["waveforms"][0, 500:].any()
    assert frames_of(batch["lengths"]).tolist() == [7, 10]


# ----------------------------------------------------------------------------------------------------------------
# Crops
# ----------------------------------------------------------------------------------------------------------------


def test_random_log_mel_crops_match_slicing_and_pad_short_clips():
    torch.manual_seed(0)
    log_mel = torch.randn(4, 3, 50) - 5.0  # batch padding is NOT zero here: the crop must zero it itself
    num_frames = torch.tensor([50, 30, 10, 16])
    crops, starts = random_log_mel_crops(log_mel, num_frames, 16, torch.Generator().manual_seed(1), return_starts=True)
    assert crops.shape == (4, 3, 16)
    for i in (0, 1, 3):
        start = int(starts[i])
        assert 0 <= start <= int(num_frames[i]) - 16
        torch.testing.assert_close(crops[i], log_mel[i, :, start : start + 16], rtol=0, atol=0)
    assert starts[2] == 0 and starts[3] == 0
    torch.testing.assert_close(crops[2, :, :10], log_mel[2, :, :10], rtol=0, atol=0)
    assert crops[2, :, 10:].eq(0).all()  # zero padding at the end, in raw log-mel space

    again, starts_again = random_log_mel_crops(
        log_mel, num_frames, 16, torch.Generator().manual_seed(1), return_starts=True
    )
    assert torch.equal(again, crops) and torch.equal(starts_again, starts)


def test_random_log_mel_crop_starts_are_uniform_and_seeded():
    log_mel = torch.arange(40.0).expand(400, 2, 40).contiguous()
    num_frames = torch.full((400,), 19)  # starts in 0..3
    _, starts = random_log_mel_crops(log_mel, num_frames, 16, torch.Generator().manual_seed(0), return_starts=True)
    counts = torch.bincount(starts, minlength=4)
    assert counts.shape == (4,) and (counts > 60).all(), counts
    _, other = random_log_mel_crops(log_mel, num_frames, 16, torch.Generator().manual_seed(1), return_starts=True)
    assert not torch.equal(starts, other)


def test_crops_of_a_collated_batch(clips):
    examples = [{"id": c["id"], "audio": c["samples"], "error": ""} for c in clips[:3]]
    batch = AudioBatchCollator(min_samples=16000)(examples)
    fe = M2D2FeatureExtractor()
    log_mel = fe.log_mel(batch["waveforms"])
    num_frames = frames_of(batch["lengths"], fe.hop_length)
    assert num_frames.tolist() == [fe.num_frames(int(n)) for n in batch["lengths"]]
    crops, starts = random_log_mel_crops(log_mel, num_frames, 96, torch.Generator().manual_seed(0), return_starts=True)
    for row, example in enumerate(examples):
        # A crop of the batch equals the same crop of the clip's own log-mel (padded to min_samples alone).
        own = torch.from_numpy(np.pad(example["audio"], (0, max(0, 16000 - example["audio"].size))))
        own_log_mel = fe.log_mel(own[None])[0]
        start = int(starts[row])
        expected = own_log_mel[:, start : start + 96]
        torch.testing.assert_close(crops[row, :, : expected.shape[1]], expected, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Caption embeddings in the collator
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def caption_table(tmp_path) -> CaptionEmbeddingTable:
    rng = np.random.default_rng(0)
    write_embedding_shard(
        tmp_path / "shard-00000.parquet",
        {"a": rng.standard_normal((3, 8)), "b": rng.standard_normal((1, 8))},
    )
    return CaptionEmbeddingTable.from_path(tmp_path)


def test_collator_draws_cached_captions(caption_table):
    examples = [{"id": name, "audio": np.ones(400, np.float32), "error": ""} for name in ("a", "c", "b")]
    collator = AudioBatchCollator(caption_table, seed=5)
    batches = [collator(examples) for _ in range(20)]
    options_a = caption_table.get("a").astype(np.float32)
    choices = []
    for batch in batches:
        assert batch["caption_embeddings"].shape == (3, 8) and batch["caption_embeddings"].dtype == torch.float32
        assert batch["has_caption"].tolist() == [True, False, True]
        assert not batch["caption_embeddings"][1].any()  # no caption: zeros, never an invented target
        only_b = caption_table.get("b")[0].astype(np.float32)
        np.testing.assert_array_equal(batch["caption_embeddings"][2].numpy(), only_b)
        (match,) = np.flatnonzero((options_a == batch["caption_embeddings"][0].numpy()).all(axis=1))
        choices.append(int(match))
    assert len(set(choices)) == 3  # the choice varies across calls

    # The collator's draws are `draw_captions` with its own generator (one draw per clip with captions).
    embeddings, has_caption = draw_captions(caption_table, ["a", "c", "b"], torch.Generator().manual_seed(5))
    assert torch.equal(embeddings, batches[0]["caption_embeddings"]) and has_caption.tolist() == [True, False, True]

    replay = AudioBatchCollator(caption_table, seed=5)
    for batch in batches:
        assert torch.equal(replay(examples)["caption_embeddings"], batch["caption_embeddings"])
    other = AudioBatchCollator(caption_table, seed=6)
    other_choices = [
        int(np.flatnonzero((options_a == other(examples)["caption_embeddings"][0].numpy()).all(axis=1))[0])
        for _ in range(20)
    ]
    assert other_choices != choices
