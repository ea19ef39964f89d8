"""ONNX export (`m2d2-hf export --format onnx`) and the onnxruntime runtime: parity with PyTorch on real clips from
0.2 s to 30 s, int8 cosine and zero-shot agreement on the 60 real test clips (the shipped demo model), CLI errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch


pytest.importorskip("onnxruntime", reason="pip install -e .[onnx]")
pytest.importorskip("onnxscript", reason="pip install -e .[onnx]")
onnx = pytest.importorskip("onnx", reason="pip install -e .[onnx]")

from transformers import pipeline  # noqa: E402

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2ClapModel, M2D2FeatureExtractor  # noqa: E402
from m2d2_hf.cli import main  # noqa: E402
from m2d2_hf.onnx_export import export_onnx, relative_error  # noqa: E402
from m2d2_hf.onnx_runtime import M2D2OnnxModel  # noqa: E402

from .test_cpu_inference import AVX2_ONLY, AVX512_BF16, simulate_cpu  # noqa: E402


DEMO_MODEL = Path(__file__).resolve().parents[1] / "examples" / "demo_model"
LABELS = json.loads((DEMO_MODEL / "demo_report.json").read_text())["labels"]


def read_clips(real_sounds_dir: Path, split: str = "test") -> list[np.ndarray]:
    with open(real_sounds_dir / "metadata.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == split]
    return [sf.read(real_sounds_dir / row["file_name"], dtype="float32")[0] for row in rows]


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> Path:
    return export_onnx(DEMO_MODEL, tmp_path_factory.mktemp("onnx") / "demo", quantize="int8")


@pytest.fixture(scope="module")
def test_clips(real_sounds_dir) -> list[np.ndarray]:
    return read_clips(real_sounds_dir)


def test_fp32_graphs_equal_pytorch_on_real_clips_from_0_2_to_30_seconds(demo_export, test_clips):
    model = M2D2ClapModel.from_pretrained(DEMO_MODEL).eval()
    runtime = M2D2OnnxModel(demo_export)
    by_length = sorted(test_clips, key=len)
    # The shortest (0.25 s) and longest (16 s) test clips, one of 3 s, and 30 s made of test clips back to back.
    thirty = np.concatenate(by_length[::-1])[: 30 * 16000]
    clips = [by_length[0][:3200], by_length[0], by_length[len(by_length) // 2], by_length[-1], thirty]
    assert len(clips[0]) == 3200 and len(thirty) == 30 * 16000
    for clip in clips:
        features = torch.from_numpy(
            runtime.feature_extractor(clip, sampling_rate=16000, return_tensors="np")["input_features"]
        )
        with torch.no_grad():
            audio = model.audio_model(features)
            expected = {
                "audio_embeds": model.get_audio_features(features).pooler_output,
                "pooler_output": audio.pooler_output,
                "frame_features": audio.frame_features,
            }
        got = runtime.audio_outputs_of(clip, 16000)
        for name, value in expected.items():
            assert got[name].shape == tuple(value.shape), name
            assert relative_error(value.numpy(), got[name]) <= 1e-4, (name, len(clip))
    texts = ["This is a sound of dog.", "a very long description of rain falling on a tin roof at night"]
    tokens = runtime.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected_text = model.get_text_features(**tokens).pooler_output.numpy()
    assert relative_error(expected_text, runtime.embed_text(texts)) <= 1e-4
    recorded = json.loads((demo_export / "onnx_config.json").read_text())["parity"]
    assert max(recorded["max_relative_error"].values()) <= 1e-4 and recorded["int8_min_cosine"] >= 0.99
    assert "Parity measured at export" in (demo_export / "README.md").read_text()


def test_int8_cosine_and_zero_shot_top1_on_the_60_test_clips(demo_export, test_clips):
    assert len(test_clips) == 60
    fp32, int8 = M2D2OnnxModel(demo_export), M2D2OnnxModel(demo_export, quantized=True)
    a, b = fp32.embed_audio(test_clips), int8.embed_audio(test_clips)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert cosine.min() >= 0.99
    classifier = pipeline("zero-shot-audio-classification", model=str(DEMO_MODEL))
    expected = [classifier(clip, candidate_labels=LABELS)[0] for clip in test_clips]
    got = [scores[0] for scores in fp32.zero_shot(test_clips, LABELS, sampling_rate=16000)]
    assert [g["label"] for g in got] == [e["label"] for e in expected]
    np.testing.assert_allclose([g["score"] for g in got], [e["score"] for e in expected], rtol=1e-3, atol=1e-5)
    assert fp32.zero_shot(test_clips[0], "dog")[0] == {"score": pytest.approx(1.0), "label": "dog"}
    with pytest.raises(ValueError, match="no {}"):
        fp32.zero_shot(test_clips[0], LABELS, hypothesis_template="a sound")


def tiny_encoder(folder: Path, layers: int = 1) -> M2D2AudioModel:
    """An encoder of width 32 with 100-frame chunks, saved with its feature extractor in `folder`."""
    torch.manual_seed(0)
    model = M2D2AudioModel(
        M2D2AudioConfig(
            hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64, chunk_frames=100
        )
    ).eval()
    model.save_pretrained(folder)
    M2D2FeatureExtractor().save_pretrained(folder)
    return model


def test_audio_encoder_export_has_no_clap_outputs(tmp_path):
    model = tiny_encoder(tmp_path / "encoder")
    runtime = M2D2OnnxModel(export_onnx(tmp_path / "encoder", tmp_path / "onnx"))
    assert runtime.audio_outputs == ["pooler_output", "frame_features"] and not list((tmp_path / "onnx").glob("*.py"))
    clip = np.random.default_rng(0).uniform(-0.5, 0.5, 40000).astype(np.float32)  # 2.5 s: three 100-frame chunks
    features = runtime.feature_extractor(clip, sampling_rate=16000, return_tensors="pt")["input_features"]
    with torch.no_grad():
        expected = model(features).pooler_output.numpy()
    assert relative_error(expected, runtime.embed_audio([clip, clip])[1:]) <= 1e-4
    with pytest.raises(ValueError, match="audio encoder only"):
        runtime.embed_text("a dog")
    with pytest.raises(FileNotFoundError, match="--quantize int8"):
        M2D2OnnxModel(tmp_path / "onnx", quantized=True)


def test_optimised_audio_graph_fuses_every_attention_and_matches_the_plain_one(tmp_path):
    model = tiny_encoder(tmp_path / "encoder", layers=2)
    optimised = export_onnx(tmp_path / "encoder", tmp_path / "optimised", quantize="int8")
    plain = export_onnx(tmp_path / "encoder", tmp_path / "plain", optimize=False)
    fused = json.loads((optimised / "onnx_config.json").read_text())["audio_fused_operators"]
    layers = model.config.num_hidden_layers
    assert fused["MultiHeadAttention"] == layers and fused["BiasGelu"] == layers
    assert "SkipLayerNormalization" not in fused  # slower than LayerNormalization + Add (optimize_audio_graph)
    assert json.loads((plain / "onnx_config.json").read_text())["audio_fused_operators"] == {}
    domains = {
        name: {node.domain for node in onnx.load(folder / "audio.onnx").graph.node}
        for name, folder in (("optimised", optimised), ("plain", plain))
    }
    assert "com.microsoft" in domains["optimised"] and domains["plain"] <= {"", "ai.onnx"}
    # 2.5 s: three 100-frame chunks, the last one partly masked; 0.4 s: one masked chunk.
    rng = np.random.default_rng(1)
    clips = [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in (40000, 6400)]
    outputs = [M2D2OnnxModel(folder).embed_audio(clips) for folder in (optimised, plain)]
    assert relative_error(outputs[1], outputs[0]) <= 1e-5
    extractor = M2D2FeatureExtractor()
    with torch.no_grad():
        expected = np.concatenate(
            [
                model(
                    extractor(clip, sampling_rate=16000, return_tensors="pt")["input_features"]
                ).pooler_output.numpy()
                for clip in clips
            ]
        )
    assert relative_error(expected, outputs[0]) <= 1e-4


@pytest.mark.parametrize(
    ("flags", "reduce_range", "expected"),
    [
        (AVX2_ONLY, None, True),  # no VNNI: onnxruntime's u8s8 kernels would saturate on 8-bit weights
        (AVX2_ONLY + ("avx_vnni",), None, False),
        (AVX512_BF16, None, False),  # AVX512-VNNI
        (AVX512_BF16, True, True),  # asked for, for a graph that will run on AVX2-only CPUs
    ],
)
def test_int8_weights_use_the_reduced_range_without_vnni(tmp_path, monkeypatch, flags, reduce_range, expected):
    import onnxruntime.quantization

    simulate_cpu(monkeypatch, flags)
    calls, quantize_dynamic = [], onnxruntime.quantization.quantize_dynamic
    monkeypatch.setattr(
        onnxruntime.quantization,
        "quantize_dynamic",
        lambda *args, **kwargs: calls.append(kwargs) or quantize_dynamic(*args, **kwargs),
    )
    tiny_encoder(tmp_path / "encoder")
    out = export_onnx(tmp_path / "encoder", tmp_path / "onnx", quantize="int8", reduce_range=reduce_range)
    assert [call["reduce_range"] for call in calls] == [expected]
    config = json.loads((out / "onnx_config.json").read_text())
    assert config["int8_reduce_range"] is expected and config["parity"]["int8_min_cosine"] >= 0.99
    assert ("7-bit weights (`reduce_range`)" in (out / "README.md").read_text()) == expected


def test_cli_export_round_trip_and_errors(tiny_clap_dir, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", str(tiny_clap_dir), str(out), "--format", "onnx"]) == 0
    assert "audio.onnx" in capsys.readouterr().out
    assert {"audio.onnx", "text.onnx", "onnx_config.json", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert M2D2OnnxModel(out).embed_text(["a", "b c"]).shape == (2, 32)

    assert main(["export", str(tiny_clap_dir), str(out), "--format", "onnx"]) == 2
    error = capsys.readouterr().err.strip()
    assert "not empty" in error and "--overwrite" in error and len(error.splitlines()) == 1
    (tmp_path / "notm2d2").mkdir()
    (tmp_path / "notm2d2" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert main(["export", str(tmp_path / "notm2d2"), str(tmp_path / "x"), "--format", "onnx"]) == 2
    assert "m2d2_audio" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export", str(tiny_clap_dir), str(out), "--format", "tflite"]) == 2
    with pytest.raises(FileNotFoundError, match="m2d2-hf export"):
        M2D2OnnxModel(tmp_path / "notm2d2")


def test_a_successful_export_prints_its_result_only(tiny_clap_dir, tmp_path):
    """No exporter notes (torchvision operators, shape inference, quantizer pre-processing) nor load progress bars:
    one line saying what was written."""
    out = tmp_path / "onnx"
    command = [sys.executable, "-m", "m2d2_hf.cli", "export", str(tiny_clap_dir), str(out), "--format", "onnx"]
    done = subprocess.run([*command, "--quantize", "int8"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote audio.int8.onnx, audio.onnx, text.onnx to {out}\n"
    assert done.stderr == ""


def test_a_failed_export_leaves_no_folder(tiny_clap_dir, tmp_path, monkeypatch):
    import m2d2_hf.onnx_export as onnx_export

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure while writing text.onnx")

    monkeypatch.setattr(onnx_export, "_export_text", fail)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(tiny_clap_dir, tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="quantize must be one of"):
        export_onnx(tiny_clap_dir, tmp_path / "onnx", quantize="int4")
