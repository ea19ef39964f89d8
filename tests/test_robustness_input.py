"""Input and CLI cases: every bad input gives the right answer or a clear error, never a silent wrong one."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import AutoTokenizer, ClapConfig, ClapFeatureExtractor, ClapModel, pipeline
from transformers.pipelines.zero_shot_audio_classification import ZeroShotAudioClassificationPipeline

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2FeatureExtractor
from m2d2_hf.cli import main
from m2d2_hf.data.audio import AudioDecodeError

from .conftest import TINY_AUDIO


TASK = "zero-shot-audio-classification"
LABELS = ["a dog barking", "rain falling", "a bell ringing"]
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fe() -> M2D2FeatureExtractor:
    return M2D2FeatureExtractor(norm_stats=[-7.0, 4.0])


@pytest.fixture(scope="module")
def wave() -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)


def features(fe, audio, **kwargs) -> np.ndarray:
    return fe(audio, sampling_rate=16000, **kwargs)["input_features"]


# --- feature extractor --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, to_pcm",
    [
        (np.uint8, lambda x: np.round(x * 127 + 128)),  # offset binary, as scipy.io.wavfile reads 8-bit WAV
        (np.int8, lambda x: np.round(x * 127)),
    ],
)
def test_8_bit_pcm_is_scaled_by_its_full_range(fe, wave, dtype, to_pcm):
    pcm = to_pcm(wave).astype(dtype)
    expected = features(fe, pcm.astype(np.float32) / 128 - (1.0 if dtype == np.uint8 else 0.0))
    np.testing.assert_allclose(features(fe, pcm), expected, atol=1e-5)
    np.testing.assert_allclose(features(fe, torch.from_numpy(pcm)), expected, atol=1e-5)


@pytest.mark.parametrize(
    "audio, match",
    [
        (np.zeros(16000, dtype=np.int64), r"int64.*no.*known full scale.*np\.int16"),
        (np.zeros(16000, dtype=np.uint16), r"uint16.*\.astype\(np\.int16\)"),
        ([0, 1000, -1000] * 6000, r"list of integers.*PCM width is unknown.*dtype=np\.int16"),
    ],
)
def test_ambiguous_integer_audio_raises(fe, audio, match):
    with pytest.raises(ValueError, match=match):
        fe(audio, sampling_rate=16000)


def test_list_of_int16_values_is_one_scaled_clip(fe, wave):
    pcm = np.round(wave * 32767).astype(np.int16)
    np.testing.assert_allclose(features(fe, list(pcm)), features(fe, pcm), atol=0)


def test_samples_too_loud_for_float32_raise_instead_of_nan(fe):
    loud = np.full(16000, 3e38, dtype=np.float32)
    with pytest.raises(ValueError, match=r"Clip 0 peaks at 3e\+38, too loud.*\[-1, 1\]"):
        fe(loud, sampling_rate=16000)
    with pytest.raises(ValueError, match="too loud"):
        fe(np.full(16000, 1e300), sampling_rate=16000)  # float64 beyond float32, no longer read as Inf
    # Up to the limit the worst cases (DC, a square wave, Nyquist) stay finite, at every input rate.
    n = np.arange(32000)
    for signal in (np.ones(32000), np.sign(np.cos(2 * np.pi * n / 8) + 1e-9), (-1.0) ** n):
        for rate in (8000, 16000, 44100):
            audio = (signal * fe.max_peak * 0.9999).astype(np.float32)
            assert np.isfinite(fe(audio, sampling_rate=rate)["input_features"]).all()


def test_samples_last_layout_under_mono_names_the_transpose(fe, wave):
    stereo = np.stack([wave, wave], axis=1)  # soundfile's [samples, channels]
    with pytest.raises(ValueError, match=r"\(16000, 2\).*channels on the last axis.*audio\.T"):
        fe(stereo, sampling_rate=16000, mono=True)
    np.testing.assert_allclose(features(fe, stereo.T, mono=True), features(fe, wave), atol=1e-6)


# --- encoder mask -------------------------------------------------------------------------------------------------


def test_masks_that_are_not_a_prefix_are_rejected(fe, wave):
    torch.manual_seed(0)
    model = M2D2AudioModel(M2D2AudioConfig(**TINY_AUDIO, norm_stats=[-7.0, 4.0])).eval()
    inputs = fe([wave, wave[:8000]], sampling_rate=16000, return_tensors="pt")
    mask = inputs["input_features_mask"]
    with torch.no_grad():
        model(**inputs)  # the extractor's own mask is accepted
        with pytest.raises(ValueError, match=r"0 and 1 only.*values \[2\]"):
            model(inputs["input_features"], mask * 2)
        # Float masks just inside float tolerance of 1 or 0 would truncate to 0 as integers.
        for value in (0.9999999, 1e-8):
            near = mask.to(torch.float32)
            near[0, 0] = value
            with pytest.raises(ValueError, match=r"0 and 1 only"):
                model(inputs["input_features"], near)
        model(inputs["input_features"], mask.to(torch.float32))  # a float mask of exact 0s and 1s is accepted
        holed = mask.clone()
        holed[1, 10:20] = 0
        with pytest.raises(ValueError, match=r"clip 1 has a 0 before a 1.*separate clips"):
            model(inputs["input_features"], holed)


# --- pipeline -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tiny_clap_dir):
    return pipeline(TASK, model=str(tiny_clap_dir))


def scores(predictions: list[dict]) -> dict[str, float]:
    return {p["label"]: p["score"] for p in predictions}


def test_pipeline_takes_audio_dicts_with_their_rate(classifier, wave):
    at_16k = scores(classifier(wave, candidate_labels=LABELS))
    wave_44k = classifier.feature_extractor.to_clips(wave, False)[0]
    import torchaudio

    wave_44k = torchaudio.functional.resample(wave_44k, 16000, 44100).numpy()
    for key in ("raw", "array"):
        audio = {key: wave_44k, "sampling_rate": 44100}
        from_dict = scores(classifier(audio, candidate_labels=LABELS))
        assert audio == {key: wave_44k, "sampling_rate": 44100}  # not mutated
        direct = classifier.feature_extractor(wave_44k, sampling_rate=44100)["input_features"]
        assert direct.shape[-1] == classifier.feature_extractor(wave, sampling_rate=16000)["input_features"].shape[-1]
        np.testing.assert_allclose(
            [from_dict[label] for label in LABELS], [at_16k[label] for label in LABELS], atol=2e-3
        )
    with pytest.raises(ValueError, match="'raw' \\(or 'array'\\) key"):
        classifier({"audio": wave, "sampling_rate": 16000}, candidate_labels=LABELS)


def test_pipeline_decodes_files_as_the_cli_does(classifier, tmp_path):
    clip = REPO_ROOT / "examples" / "data" / "audio" / "alarm" / "fd_phone_outgoing_calling.flac"
    wave, rate = sf.read(str(clip), dtype="float32")
    assert rate == 16000
    from_file = scores(classifier(str(clip), candidate_labels=LABELS))
    from_bytes = scores(classifier(clip.read_bytes(), candidate_labels=LABELS))
    from_array = scores(classifier(wave, candidate_labels=LABELS))
    for label in LABELS:
        assert from_file[label] == pytest.approx(from_array[label], abs=1e-6)
        assert from_bytes[label] == pytest.approx(from_array[label], abs=1e-6)
    truncated = tmp_path / "truncated.flac"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])
    for damaged in (str(truncated), truncated.read_bytes()):
        with pytest.raises(AudioDecodeError, match="lost sync"):
            classifier(damaged, candidate_labels=LABELS)


def test_pipeline_labels_and_template_are_checked(classifier, wave):
    with pytest.raises(ValueError, match="candidate_labels is empty"):
        classifier(wave, candidate_labels=[])
    single = classifier(wave, candidate_labels="a dog barking")
    assert [p["label"] for p in single] == ["a dog barking"] and single[0]["score"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"has no \{\} for the label"):
        classifier(wave, candidate_labels=LABELS, hypothesis_template="a sound")
    # A repeated label would split its probability between the copies (0.5 / 0.5 where 1.0 is meant).
    with pytest.raises(ValueError, match=r"the labels repeat \['a dog barking'\]: give each class once"):
        classifier(wave, candidate_labels=["a dog barking", "rain", "a dog barking"])


def test_pipeline_of_other_models_is_unchanged(tokenizer_dir, wave):
    """A tiny transformers CLAP model gets exactly what transformers' own pipeline class gives it."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, model_input_names=["input_ids", "attention_mask"])
    text = dict(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=16,
        projection_dim=8,
    )
    audio = dict(
        depths=[1, 1, 1, 1],
        patch_embeds_hidden_size=8,
        hidden_size=64,
        num_attention_heads=[1, 1, 1, 1],
        projection_dim=8,
    )
    model = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=8)).eval()
    parts = dict(model=model, tokenizer=tokenizer, feature_extractor=ClapFeatureExtractor(truncation="rand_trunc"))
    ours, stock = pipeline(TASK, **parts), pipeline(TASK, **parts, pipeline_class=ZeroShotAudioClassificationPipeline)
    audio_48k = np.resize(wave, 48000)
    assert ours(audio_48k, candidate_labels=LABELS) == stock(audio_48k, candidate_labels=LABELS)
    assert ours(audio_48k, candidate_labels="dog") == stock(audio_48k, candidate_labels="dog")  # letter by letter
    for bad in ({"raw": audio_48k, "sampling_rate": 48000},):
        with pytest.raises(TypeError):
            stock(bad, candidate_labels=LABELS)
        with pytest.raises(TypeError):
            ours(bad, candidate_labels=LABELS)


# --- CLI ----------------------------------------------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory, wave) -> list[Path]:
    folder = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    paths = []
    for index, seconds in enumerate((1.0, 2.3, 0.6)):
        path = folder / f"clip{index}.wav"
        sf.write(str(path), (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32), 16000)
        paths.append(path)
    return paths


def assert_one_line_error(code: int, err: str, message: str) -> None:
    """Exit 2 and the error as the last stderr line (above it at most argparse's usage or a progress bar)."""
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("m2d2-hf") and "error: " in last and message in last, err
    assert "Traceback" not in err


@pytest.mark.parametrize("case", ["npy into a file", "safetensors into a file", "timeline png into a file"])
def test_unwritable_outputs_fail_before_the_compute(case, tiny_clap_dir, audio_files, tmp_path, capsys, monkeypatch):
    """An --output under a regular file (unwritable even for root) fails with one line, before the model loads."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    loaded = []
    monkeypatch.setattr("m2d2_hf.cli.prepare_model", lambda *args: loaded.append(args))
    argv = {
        "npy into a file": ["embed", tiny_clap_dir, audio_files[0], "-o", blocker / "emb"],
        "safetensors into a file": ["embed", tiny_clap_dir, audio_files[0], "-o", blocker / "emb.safetensors"],
        "timeline png into a file": [
            "timeline",
            tiny_clap_dir,
            audio_files[1],
            "--queries",
            "a",
            "--output",
            blocker / "t.png",
        ],
    }[case]
    code, out, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "cannot write --output")
    assert not loaded and out == ""


def test_failed_safetensors_write_is_one_line_and_leaves_no_file(
    tiny_clap_dir, audio_files, tmp_path, capsys, monkeypatch
):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("m2d2_hf.cli.save_file", full_disk)
    out = tmp_path / "emb.safetensors"
    code, _, err = run_cli(capsys, "embed", tiny_clap_dir, audio_files[0], "-o", out)
    assert_one_line_error(code, err, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_truncated_weights_are_one_line(tiny_clap_dir, audio_files, tmp_path, capsys):
    broken = tmp_path / "model"
    broken.mkdir()
    for path in Path(tiny_clap_dir).iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for argv in (
        ["embed", broken, audio_files[0], "-o", tmp_path / "out"],
        ["zero-shot", broken, audio_files[0], "--labels", "a,b"],
        ["timeline", broken, audio_files[1], "--queries", "a", "--output", tmp_path / "t.png"],
    ):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "cannot load the model")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--window", "0.05"], "shorter than the model's shortest input"),
        (["--window", "nan"], "positive, finite number of seconds"),
        (["--hop", "inf"], "positive, finite number of seconds"),
        (["--hop", "0.00001"], "shorter than one sample"),
    ],
)
def test_timeline_window_and_hop_are_checked(flags, message, tiny_clap_dir, audio_files, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "timeline", tiny_clap_dir, audio_files[1], "--queries", "a", "--output", tmp_path / "t.png", *flags
    )
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "t.png").exists()


def test_zero_shot_options_before_files_and_batched_results(classifier, tiny_clap_dir, audio_files, capsys):
    """Options may come before the files; the batched results equal one pipeline call per file."""
    code, out, err = run_cli(
        capsys, "zero-shot", tiny_clap_dir, "--labels", ",".join(LABELS), "--json", "--batch-size", "2", *audio_files
    )
    assert code == 0, err
    results = json.loads(out)
    assert [result["file"] for result in results] == [str(path) for path in audio_files]
    for path, result in zip(audio_files, results):
        audio, _ = sf.read(str(path), dtype="float32")
        expected = classifier(audio, candidate_labels=LABELS, hypothesis_template="{} can be heard")
        assert [p["label"] for p in result["predictions"]] == [p["label"] for p in expected]
        np.testing.assert_allclose(
            [p["score"] for p in result["predictions"]], [p["score"] for p in expected], atol=1e-5
        )
    # A usage error names the sub-command whose usage applies.
    code, _, err = run_cli(capsys, "zero-shot", tiny_clap_dir, "--top-k", "0", *audio_files)
    assert code == 2 and "m2d2-hf zero-shot: error:" in err and "usage: m2d2-hf zero-shot" in err
