"""Text-queried timeline: window placement, similarities equal to a direct computation, CSV/JSON/PNG outputs,
and the CLI command on a concatenation of real clips."""

import csv
import json

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoProcessor

from m2d2_hf import M2D2ClapModel
from m2d2_hf.cli import main
from m2d2_hf.timeline import sound_event_timeline


@pytest.fixture(scope="module")
def clap(tiny_clap_dir):
    return M2D2ClapModel.from_pretrained(tiny_clap_dir).eval(), AutoProcessor.from_pretrained(tiny_clap_dir)


@pytest.fixture(scope="module")
def concatenation(real_sounds_dir, tmp_path_factory):
    """Three real clips of different classes end to end (a bird, a dog/cat, a piano-like keyboard)."""
    parts = []
    for label in ("bird", "dog_cat", "keyboard"):
        wave, rate = sf.read(sorted((real_sounds_dir / "audio" / label).glob("*.flac"))[0], dtype="float32")
        parts.append(wave[: 3 * rate])
    path = tmp_path_factory.mktemp("timeline") / "three_sounds.flac"
    sf.write(path, np.concatenate(parts), 16000)
    return path, np.concatenate(parts)


def test_similarities_equal_a_direct_computation(clap, concatenation):
    model, processor = clap
    _, wave = concatenation
    queries = ["a bird sings", "a dog barks"]
    timeline = sound_event_timeline(model, processor, wave, queries, window_seconds=1.0, hop_seconds=0.5)
    expected_starts = list(range(0, len(wave) - 16000 + 1, 8000))
    if expected_starts[-1] + 16000 < len(wave):
        expected_starts.append(len(wave) - 16000)
    np.testing.assert_allclose(timeline.times, (np.array(expected_starts) + 8000) / 16000)
    assert timeline.similarities.shape == (2, len(expected_starts))
    with torch.no_grad():
        start = expected_starts[3]
        audio = model.get_audio_features(**processor(audio=wave[start : start + 16000], sampling_rate=16000))
        text = model.get_text_features(**processor(text=queries[1:]))
    expected = float(audio.pooler_output[0] @ text.pooler_output[0])
    assert timeline.similarities[1, 3] == pytest.approx(expected, abs=1e-5)


def test_short_recordings_and_bad_arguments(clap):
    model, processor = clap
    short = np.random.default_rng(0).uniform(-0.5, 0.5, 8000).astype(np.float32)
    timeline = sound_event_timeline(model, processor, short, ["noise"], window_seconds=2.0)
    assert timeline.similarities.shape == (1, 1) and timeline.window_seconds == 0.5
    with pytest.raises(ValueError, match="query"):
        sound_event_timeline(model, processor, short, [])
    with pytest.raises(ValueError, match="mono"):
        sound_event_timeline(model, processor, np.zeros((2, 8000), np.float32), ["x"])


def test_cli_writes_png_csv_and_json(tiny_clap_dir, concatenation, tmp_path, capsys):
    path, _ = concatenation
    out = tmp_path / "plot.png"
    code = main(
        ["timeline", str(tiny_clap_dir), str(path), "--queries", "a bird sings,a dog barks", "--output", str(out)]
    )
    assert code == 0, capsys.readouterr().err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    rows = list(csv.reader(open(out.with_suffix(".csv"))))
    assert rows[0] == ["time_s", "a bird sings", "a dog barks"] and len(rows) > 10
    data = json.loads(out.with_suffix(".json").read_text())
    assert set(data["similarities"]) == {"a bird sings", "a dog barks"}
    assert "peak" in capsys.readouterr().out
    assert main(["timeline", str(tiny_clap_dir), str(path), "--queries", " , ", "--output", str(out)]) == 2
    assert (
        main(["timeline", str(tiny_clap_dir), str(path), "--queries", "x", "--output", str(tmp_path / "a.txt")]) == 2
    )
