"""The `m2d2-hf` command line (run in-process through `main`) and the conversion wrapper script."""

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from transformers import AutoFeatureExtractor, AutoModel, AutoProcessor

from m2d2_hf.cli import main, prepare_model
from m2d2_hf.cpu_inference import cpu_has_native_bf16

from . import original_layout as layout
from .test_cpu_inference import AVX2_ONLY, simulate_cpu
from .test_modeling import tiny_clap_model


REPO_ROOT = Path(__file__).resolve().parents[1]
WRAPPER = REPO_ROOT / "conversion" / "convert_original_m2d2.py"
# A tiny original-layout encoder: 80x208 input, 16x16 patches (5 x 13 grid), 2 layers of width 64 (one 64-d head).
HIDDEN = 64
CHUNK_FRAMES, PATCH = 208, 16
NORM_STATS = [-7.0, 4.0]


def tiny_original_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = layout.encoder_state(dim=HIDDEN, frames=CHUNK_FRAMES)
    state["norm_stats"] = torch.tensor(NORM_STATS)
    return {f"backbone.{key}": value for key, value in state.items()}


def expected_frames(num_samples: int) -> int:
    """T' by the spec's chunking (§4): 1 + L // 160 log-mel frames, chunks of 208 frames, 16-frame columns."""
    frames = 1 + num_samples // 160
    return (frames // CHUNK_FRAMES) * (CHUNK_FRAMES // PATCH) + math.ceil(frames % CHUNK_FRAMES / PATCH)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("original") / "m2d_vit_base-80x208p16x16-240101"
    folder.mkdir()
    path = folder / "checkpoint-1.pth"
    torch.save({"model": tiny_original_state()}, path)
    return path


@pytest.fixture(scope="module")
def encoder_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_encoder")
    assert main(["convert", str(tiny_checkpoint), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def clips(real_sounds_dir) -> list[Path]:
    """Three real 16 kHz clips: one shorter than a 208-frame chunk, two spanning several chunks."""
    with open(real_sounds_dir / "metadata.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["file_name"])
    short = next(row for row in rows if 1.0 < float(row["duration_s"]) < 2.0)
    long = [row for row in rows if 4.5 < float(row["duration_s"]) < 8.0][:2]
    return [real_sounds_dir / row["file_name"] for row in [short, *long]]


def encode_directly(model_dir: Path, audio, sampling_rate: int, mono: bool = False):
    """The audio tower's outputs for one clip, without the CLI."""
    feature_extractor = AutoFeatureExtractor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir)
    inputs = feature_extractor(audio, sampling_rate=sampling_rate, mono=mono, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs)


def test_convert_writes_the_encoder(tiny_checkpoint, tmp_path, capsys):
    code, out, err = run_cli(capsys, "convert", tiny_checkpoint, tmp_path / "model", "--encoder-only")
    assert code == 0, err
    assert f"wrote M2D2AudioModel to {tmp_path / 'model'}" in out
    model = AutoModel.from_pretrained(tmp_path / "model")
    assert type(model).__name__ == "M2D2AudioModel"
    assert model.config.chunk_frames == CHUNK_FRAMES and model.config.hidden_size == HIDDEN
    assert AutoFeatureExtractor.from_pretrained(tmp_path / "model").norm_stats == NORM_STATS
    original = tiny_original_state()
    torch.testing.assert_close(
        model.layers[1].attention.qkv.weight, original["backbone.blocks.1.attn.qkv.weight"], rtol=0, atol=0
    )


def test_convert_overrides_reach_the_converter(tiny_checkpoint, tmp_path, capsys):
    # 80x304 disagrees with the 66-row pos_embed: the converter refuses, and the CLI reports it on one line.
    code, out, err = run_cli(capsys, "convert", tiny_checkpoint, tmp_path / "model", "--input-size", "80x304")
    assert code == 2
    assert "pos_embed" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "model").exists()


def test_embed_npy_clip_and_frames(encoder_dir, clips, tmp_path, capsys):
    code, out, err = run_cli(capsys, "embed", encoder_dir, *clips, "--output", tmp_path / "emb", "--level", "all")
    assert code == 0, err
    for clip in clips:
        info = sf.info(str(clip))
        frames = np.load(tmp_path / "emb" / f"{clip.stem}.frames.npy")
        timestamps = np.load(tmp_path / "emb" / f"{clip.stem}.timestamps.npy")
        embedding = np.load(tmp_path / "emb" / f"{clip.stem}.clip.npy")
        count = expected_frames(info.frames)
        assert frames.shape == (count, 5 * HIDDEN)
        assert embedding.shape == (5 * HIDDEN,)
        assert timestamps.shape == (count,) and timestamps.dtype == np.float32
        np.testing.assert_allclose(timestamps[1], info.frames / info.samplerate / count * 1000, rtol=1e-6)
        np.testing.assert_allclose(embedding, frames.mean(0), atol=1e-5)
        # An audio-only folder has no CLAP level, even with --level all.
        assert not (tmp_path / "emb" / f"{clip.stem}.clap.npy").exists()

    audio, rate = sf.read(str(clips[1]), dtype="float32")
    direct = encode_directly(encoder_dir, audio, rate)
    got = np.load(tmp_path / "emb" / f"{clips[1].stem}.clip.npy")
    np.testing.assert_allclose(got, direct.pooler_output[0], atol=1e-5)


def test_embed_safetensors_is_batch_invariant(encoder_dir, clips, tmp_path, capsys):
    code, _, err = run_cli(
        capsys, "embed", encoder_dir, *clips, "-o", tmp_path / "npy", "--level", "frame", "--batch-size", "3"
    )
    assert code == 0, err
    code, out, err = run_cli(
        capsys,
        "embed",
        encoder_dir,
        *clips,
        "-o",
        tmp_path / "emb.st",
        "--format",
        "safetensors",
        "--level",
        "frame",
        "--batch-size",
        "1",
    )
    assert code == 0, err
    tensors = load_file(tmp_path / "emb.st")
    assert set(tensors) == {f"{clip.stem}/{name}" for clip in clips for name in ("frames", "timestamps")}
    with safe_open(tmp_path / "emb.st", "np") as handle:
        assert handle.metadata()["levels"] == "frame"
    for clip in clips:
        # Batched (padded) and single-clip passes give the same frames.
        np.testing.assert_allclose(
            tensors[f"{clip.stem}/frames"], np.load(tmp_path / "npy" / f"{clip.stem}.frames.npy"), atol=1e-5
        )
        np.testing.assert_array_equal(
            tensors[f"{clip.stem}/timestamps"], np.load(tmp_path / "npy" / f"{clip.stem}.timestamps.npy")
        )


def test_embed_averages_channels_and_resamples(encoder_dir, tmp_path, capsys):
    rate = 22050
    rng = np.random.default_rng(0)
    stereo = (0.1 * rng.standard_normal((2 * rate, 2))).astype(np.float32)
    stereo[:, 1] *= 0.25  # unequal channels, so keeping one channel would not pass
    path = tmp_path / "stereo.wav"
    sf.write(str(path), stereo, rate, subtype="FLOAT")

    code, _, err = run_cli(capsys, "embed", encoder_dir, path, "-o", tmp_path / "emb.safetensors")
    assert code == 0, err
    got = load_file(tmp_path / "emb.safetensors")
    assert set(got) == {"stereo/clip"}
    direct = encode_directly(encoder_dir, stereo.T, rate, mono=True)
    np.testing.assert_allclose(got["stereo/clip"], direct.pooler_output[0], atol=1e-5)


def test_embed_clap_levels(tiny_clap_dir, clips, tmp_path, capsys):
    code, _, err = run_cli(capsys, "embed", tiny_clap_dir, *clips[:2], "-o", tmp_path / "emb", "--level", "all")
    assert code == 0, err
    processor = AutoProcessor.from_pretrained(tiny_clap_dir)
    model = AutoModel.from_pretrained(tiny_clap_dir)
    for clip in clips[:2]:
        audio, rate = sf.read(str(clip), dtype="float32")
        inputs = processor(audio=audio, sampling_rate=rate)
        with torch.no_grad():
            clap = model.get_audio_features(**inputs).pooler_output[0]
            tower = model.audio_model(**inputs)
        got = np.load(tmp_path / "emb" / f"{clip.stem}.clap.npy")
        np.testing.assert_allclose(got, clap, atol=1e-5)
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-5)
        got = np.load(tmp_path / "emb" / f"{clip.stem}.clip.npy")
        np.testing.assert_allclose(got, tower.pooler_output[0], atol=1e-5)
        assert np.load(tmp_path / "emb" / f"{clip.stem}.frames.npy").shape == (expected_frames(len(audio)), 5 * 32)


def test_zero_shot_json(tiny_clap_dir, clips, tmp_path, capsys):
    labels = ["dog_cat", "alarm", "horse_donkey", "rain"]
    code, out, err = run_cli(
        capsys, "zero-shot", tiny_clap_dir, *clips[:2], "--labels", ",".join(labels), "--top-k", "3", "--json"
    )
    assert code == 0, err
    results = json.loads(out)
    assert [result["file"] for result in results] == [str(clip) for clip in clips[:2]]

    processor = AutoProcessor.from_pretrained(tiny_clap_dir)
    model = AutoModel.from_pretrained(tiny_clap_dir)
    prompts = [f"{label.replace('_', ' ')} can be heard" for label in labels]
    for clip, result in zip(clips, results):
        audio, rate = sf.read(str(clip), dtype="float32")
        with torch.no_grad():
            scores = model(**processor(text=prompts, audio=audio, sampling_rate=rate)).logits_per_audio[0].softmax(-1)
        order = scores.argsort(descending=True)[:3].tolist()
        # Original label names (underscores kept) in score order.
        assert [p["label"] for p in result["predictions"]] == [labels[i] for i in order]
        np.testing.assert_allclose([p["score"] for p in result["predictions"]], scores[order].numpy(), atol=1e-5)


def test_zero_shot_table_labels_file_and_template(tiny_clap_dir, clips, tmp_path, capsys):
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("dog_cat\n\nalarm\n")
    code, out, err = run_cli(
        capsys, "zero-shot", tiny_clap_dir, clips[0], "--labels-file", labels_file, "--template", "the sound of {}"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == str(clips[0])
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["1", "2"] and {row[1] for row in rows} == {"dog_cat", "alarm"}

    processor = AutoProcessor.from_pretrained(tiny_clap_dir)
    model = AutoModel.from_pretrained(tiny_clap_dir)
    audio, rate = sf.read(str(clips[0]), dtype="float32")
    with torch.no_grad():
        inputs = processor(text=["the sound of dog cat", "the sound of alarm"], audio=audio, sampling_rate=rate)
        scores = model(**inputs).logits_per_audio[0].softmax(-1)
    assert float(rows[0][2]) == pytest.approx(float(scores.max()), abs=1e-4)


def write_metadata(folder: Path, clips: list[Path]) -> Path:
    """A labelled audiofolder over copies of the clips: two test clips, one train clip, three labels."""
    rows = [("a.flac", "dog_cat", "test"), ("b.flac", "alarm", "test"), ("c.flac", "rain", "train")]
    for clip, (name, _, _) in zip(clips, rows):
        (folder / name).write_bytes(clip.read_bytes())
    metadata = folder / "metadata.csv"
    with open(metadata, "w", newline="") as handle:
        csv.writer(handle).writerows([("file_name", "label", "split"), *rows])
    return metadata


def test_zero_shot_scores_the_files_of_a_labelled_split(tiny_clap_dir, clips, tmp_path, capsys):
    metadata = write_metadata(tmp_path, clips)
    code, out, err = run_cli(capsys, "zero-shot", tiny_clap_dir, "--metadata", metadata, "--split", "test", "--json")
    assert code == 0, err
    report = json.loads(out)
    results = report["results"]
    assert [Path(result["file"]).name for result in results] == ["a.flac", "b.flac"]
    assert [result["target"] for result in results] == ["dog_cat", "alarm"]
    # All three labels of the file are candidates, although the train clip's label is not in the split.
    assert {p["label"] for p in results[0]["predictions"]} == {"dog_cat", "alarm", "rain"}
    correct = sum(result["predictions"][0]["label"] == result["target"] for result in results)
    assert report["correct"] == correct and report["top1_accuracy"] == correct / 2
    assert report["num_labels"] == 3 and report["chance_accuracy"] == pytest.approx(1 / 3)

    code, out, err = run_cli(capsys, "zero-shot", tiny_clap_dir, tmp_path / "b.flac", "--metadata", metadata)
    assert code == 0, err
    assert "(target: alarm)" in out and out.strip().splitlines()[-1].startswith("top-1 accuracy ")


@pytest.mark.parametrize(
    "case",
    [
        "split without metadata",
        "file not in metadata",
        "no audio",
        "empty split",
        "missing label column",
        "label not a candidate",
        "missing checkpoint",
        "not a checkpoint",
        "missing file",
        "not audio",
        "directory as audio",
        "not a model",
        "no config",
        "clap on encoder",
        "zero-shot on encoder",
        "empty labels",
        "blank labels",
        "template without {}",
        "repeated label",
        "same stem",
        "too short",
    ],
)
def test_user_errors_exit_2_with_one_line(case, encoder_dir, tiny_clap_dir, tokenizer_dir, clips, tmp_path, capsys):
    out = tmp_path / "out"
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("not audio")
    copy = tmp_path / clips[0].name
    copy.write_bytes(clips[0].read_bytes())
    short = tmp_path / "short.wav"
    sf.write(str(short), np.zeros(1000, dtype=np.float32), 16000)
    metadata = write_metadata(tmp_path, clips)
    argv, message = {
        "split without metadata": (
            ["zero-shot", tiny_clap_dir, clips[0], "--labels", "a", "--split", "test"],
            "pass --metadata too",
        ),
        "file not in metadata": (["zero-shot", tiny_clap_dir, clips[0], "--metadata", metadata], "not listed"),
        "no audio": (["zero-shot", tiny_clap_dir, "--labels", "a,b"], "no audio given"),
        "empty split": (["zero-shot", tiny_clap_dir, "--metadata", metadata, "--split", "dev"], "lists no clips"),
        "missing label column": (
            ["zero-shot", tiny_clap_dir, "--metadata", metadata, "--label-column", "tag"],
            "has no 'tag' column",
        ),
        "label not a candidate": (
            ["zero-shot", tiny_clap_dir, "--metadata", metadata, "--labels", "dog_cat,rain"],
            "not among the class names",
        ),
        "missing checkpoint": (["convert", tmp_path / "absent.pth", out], "checkpoint not found"),
        "not a checkpoint": (["convert", not_audio, out, "--input-size", "80x208"], "cannot convert"),
        "missing file": (["embed", encoder_dir, tmp_path / "absent.flac", "-o", out], "no such file"),
        "not audio": (["embed", encoder_dir, not_audio, "-o", out], "cannot read audio file"),
        "directory as audio": (["embed", encoder_dir, tmp_path, "-o", out], "not a file"),
        "not a model": (["embed", tokenizer_dir, clips[0], "-o", out], "is not an M2D2 model"),
        "no config": (["embed", tmp_path, clips[0], "-o", out], "no config.json"),
        "clap on encoder": (["embed", encoder_dir, clips[0], "-o", out, "--level", "clap"], "--level clap needs"),
        "zero-shot on encoder": (["zero-shot", encoder_dir, clips[0], "--labels", "a,b"], "audio encoder only"),
        "empty labels": (["zero-shot", tiny_clap_dir, clips[0], "--labels", ""], "no labels"),
        "blank labels": (["zero-shot", tiny_clap_dir, clips[0], "--labels", " , "], "no labels"),
        "template without {}": (["zero-shot", tiny_clap_dir, clips[0], "--labels", "a", "--template", "x"], "no {}"),
        "repeated label": (["zero-shot", tiny_clap_dir, clips[0], "--labels", "a,b,a"], "the labels repeat"),
        "same stem": (["embed", encoder_dir, clips[0], copy, "-o", out], "same stem"),
        "too short": (["embed", encoder_dir, short, "-o", out], "too short"),
    }[case]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("m2d2-hf: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert stdout == "" and not out.exists()


def test_wrapper_script(tiny_checkpoint, encoder_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_original_m2d2", WRAPPER)
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    assert wrapper.main(["--help"]) == 0
    usage = capsys.readouterr().out
    for flag in (
        "--tokenizer",
        "--text-model",
        "--text-pooling",
        "--input-size",
        "--patch-size",
        "--sampling-rate",
        "--encoder-only",
        "CHECKPOINT",
        "OUT_DIR",
    ):
        assert flag in usage

    result = subprocess.run(
        [sys.executable, str(WRAPPER), str(tiny_checkpoint), str(tmp_path / "model")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "wrote M2D2AudioModel" in result.stdout
    written = load_file(tmp_path / "model" / "model.safetensors")
    in_process = load_file(encoder_dir / "model.safetensors")
    assert written.keys() == in_process.keys()
    for key, value in written.items():
        np.testing.assert_array_equal(value, in_process[key])


def test_bf16_runs_every_model_command_close_to_float32(tiny_clap_dir, clips, tmp_path, capsys):
    """`--bf16` (tuned for the CPU here) on embed, zero-shot and timeline: outputs within bf16 rounding of float32;
    on a CPU without native bf16 they are the float32 outputs, with a warning."""
    native = cpu_has_native_bf16()
    for flags, folder in (([], "fp32"), (["--bf16"], "bf16")):
        code, _, err = run_cli(
            capsys, "embed", tiny_clap_dir, *clips[:2], "-o", tmp_path / folder, "--level", "all", *flags
        )
        assert code == 0, err
        assert ("--bf16 ignored" in err) == (bool(flags) and not native), err
    for clip in clips[:2]:
        for level in ("clip", "clap"):
            fp32 = np.load(tmp_path / "fp32" / f"{clip.stem}.{level}.npy")
            bf16 = np.load(tmp_path / "bf16" / f"{clip.stem}.{level}.npy")
            assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
            cosine = float(fp32 @ bf16 / np.linalg.norm(fp32) / np.linalg.norm(bf16))
            assert 0.995 < cosine, (level, cosine)
            if native:
                assert not np.array_equal(fp32, bf16), level  # bf16 did run
            else:
                np.testing.assert_allclose(bf16, fp32, rtol=1e-5, atol=1e-6, err_msg=level)

    labels = "dog_cat,alarm,rain"
    scores = {}
    for flags in ([], ["--bf16"]):
        code, out, err = run_cli(capsys, "zero-shot", tiny_clap_dir, clips[0], "--labels", labels, "--json", *flags)
        assert code == 0, err
        predictions = json.loads(out)[0]["predictions"]
        scores[bool(flags)] = {p["label"]: p["score"] for p in predictions}
    assert sum(scores[True].values()) == pytest.approx(1.0, abs=1e-2)
    for label, value in scores[False].items():  # bf16 logits (scaled cosines) carry ~3 significant digits
        assert scores[True][label] == pytest.approx(value, abs=0.05)

    code, out, err = run_cli(
        capsys,
        "timeline",
        tiny_clap_dir,
        clips[0],
        "--queries",
        "a dog barks",
        "--bf16",
        "--output",
        tmp_path / "timeline.png",
    )
    assert code == 0, err
    assert "peak" in out and (tmp_path / "timeline.png").exists()


def test_bf16_keeps_float32_with_a_warning_on_a_cpu_without_native_bf16(
    monkeypatch, tiny_clap_dir, clips, tmp_path, capsys
):
    """On an AVX2-only CPU (simulated) `--bf16` says why in one line on stderr and runs float32, which is faster
    there than emulated bf16: the float32 outputs, to float rounding. Other devices are cast as asked."""
    simulate_cpu(monkeypatch, AVX2_ONLY)
    for flags, folder in (([], "fp32"), (["--bf16"], "bf16")):
        code, _, err = run_cli(capsys, "embed", tiny_clap_dir, clips[0], "-o", tmp_path / folder, *flags)
        assert code == 0, err
    warning = [line for line in err.splitlines() if "--bf16" in line]
    assert len(warning) == 1 and "no native bf16 (AVX512-BF16 or AMX)" in warning[0], err
    assert "running in float32" in warning[0]
    fp32, kept = (np.load(tmp_path / folder / f"{clips[0].stem}.clip.npy") for folder in ("fp32", "bf16"))
    np.testing.assert_allclose(kept, fp32, rtol=1e-5, atol=1e-6)

    model = prepare_model(tiny_clap_model(), torch.device("cpu"), bf16=True)
    assert model.dtype == torch.float32 and "--bf16 ignored" in capsys.readouterr().err
    model = prepare_model(tiny_clap_model(), torch.device("meta"), bf16=True)  # a GPU stand-in: unchanged
    assert model.dtype == torch.bfloat16 and capsys.readouterr().err == ""


def test_module_form_runs_the_cli():
    """`python -m m2d2_hf.cli` is the console script: usage on --help, exit 2 and one line for a bad command."""
    help_run = subprocess.run([sys.executable, "-m", "m2d2_hf.cli", "--help"], capture_output=True, text=True)
    assert help_run.returncode == 0 and "usage:" in help_run.stdout and "zero-shot" in help_run.stdout
    bad = subprocess.run([sys.executable, "-m", "m2d2_hf.cli", "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.fixture(scope="module")
def damaged_model_dirs(tiny_clap_dir, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny CLAP folder whose weights are a truncated safetensors file, or a pickle that holds more
    than tensors (what weights-only loading refuses)."""
    import fractions
    import shutil

    folders = {}
    for kind in ("truncated", "pickle"):
        folder = tmp_path_factory.mktemp(kind)
        shutil.copytree(tiny_clap_dir, folder, dirs_exist_ok=True)
        weights = folder / "model.safetensors"
        if kind == "truncated":
            weights.write_bytes(weights.read_bytes()[:1000])
        else:
            state = dict(load_file(weights))
            weights.unlink()
            tensors = {key: torch.from_numpy(value) for key, value in state.items()}
            torch.save({**tensors, "x": fractions.Fraction(1, 3)}, folder / "pytorch_model.bin")
        folders[kind] = folder
    return folders


@pytest.mark.parametrize(
    "command",
    ["embed", "zero-shot", "timeline", "export", "index", "search"],
)
@pytest.mark.parametrize("kind", ["truncated", "pickle"])
def test_damaged_weights_end_every_command_in_one_line(
    command, kind, damaged_model_dirs, tiny_clap_dir, clips, tmp_path, capsys
):
    model, out = damaged_model_dirs[kind], tmp_path / "out"
    if command == "search":  # an index built by a sound model, searched with the damaged one
        assert main(["index", str(tiny_clap_dir), str(clips[0].parent), "--output", str(tmp_path / "index")]) == 0
        capsys.readouterr()
    argv = {
        "embed": ["embed", model, clips[0], "-o", out],
        "zero-shot": ["zero-shot", model, clips[0], "--labels", "a,b"],
        "timeline": ["timeline", model, clips[0], "--queries", "a dog", "--output", out / "timeline.png"],
        "export": ["export", model, out, "--format", "onnx"],
        "index": ["index", model, clips[0].parent, "--output", out],
        "search": ["search", tmp_path / "index", "a dog", "--model", model],
    }[command]
    code, stdout, err = run_cli(capsys, *argv)
    expected = "Error while deserializing header" if kind == "truncated" else "save the weights as model.safetensors"
    assert code == 2 and err.startswith("m2d2-hf: error: cannot load the model from ") and expected in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # embed and timeline check that --output is writable before the model loads (creating its folder): nothing else
    assert stdout == "" and (not out.exists() or not any(out.iterdir()))
