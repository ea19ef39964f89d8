"""The stage-2 program end to end: frozen tiny encoder, the MiniLM text tower, two connected CPU processes,
step-exact resume, an untouched encoder, a pipeline-ready export, and stage 2.1 continuing from it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers import AutoModel, pipeline

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2ClapModel, M2D2Config, M2D2FeatureExtractor, M2D2Processor
from m2d2_hf.training.stage2 import Stage2Settings, build_model, crop_padding_mask

from .conftest import TINY_AUDIO
from .test_model_card import assert_model_card


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "pretrain_stage2.py"


def run(args: list, processes: int = 1) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable, str(SCRIPT)]
    if processes > 1:
        # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   str(SCRIPT)]  # fmt: skip
    result = subprocess.run(command + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("encoder")
    M2D2AudioModel(M2D2AudioConfig(**TINY_AUDIO)).save_pretrained(folder)
    M2D2FeatureExtractor(norm_stats=[-9.0, 4.0]).save_pretrained(folder)
    return folder


def common_args(real_sounds_dir, encoder_dir, tokenizer_dir, output_dir, steps) -> list:
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    return [
        "--train_data", real_sounds_dir, "--filter", "split=train", "--audio_model", encoder_dir,
        "--text_model", tokenizer_dir, "--output_dir", output_dir, "--crop_frames", 208,
        "--max_train_steps", steps, "--global_batch_size", 8, "--per_device_train_batch_size", 2,
        "--logging_steps", 1, "--dataloader_num_workers", 1, "--shuffle_buffer", 32, "--base_learning_rate", 0.01,
    ]  # fmt: skip


def test_two_processes_resume_freeze_and_export(real_sounds_dir, encoder_dir, tokenizer_dir, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = common_args(real_sounds_dir, encoder_dir, tokenizer_dir, full, 4) + ["--checkpointing_steps", 2]
    run(args, processes=2)
    history = metrics(full)
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert all(np.isfinite(m["loss"]) and 0 <= m["logit_scale"] <= np.log(100) + 1e-6 for m in history)
    resume = common_args(real_sounds_dir, encoder_dir, tokenizer_dir, resumed, 4)
    run(resume + ["--checkpointing_steps", 2, "--resume_from_checkpoint", full / "step_2"], processes=2)
    for expected, got in zip(history[2:], metrics(resumed)):
        for key in ("step", "loss", "logit_scale"):
            assert got[key] == expected[key], (key, expected, got)

    # The encoder is bit-identical to the one training started from; the projector and text tower moved.
    model = M2D2ClapModel.from_pretrained(full / "final")
    original = M2D2AudioModel.from_pretrained(encoder_dir)
    for name, tensor in original.state_dict().items():
        assert torch.equal(model.audio_model.state_dict()[name], tensor), name
    start = load_file(full / "step_2" / "model.safetensors")
    end = load_file(full / "step_4" / "model.safetensors")
    assert not torch.equal(start["clap.audio_projection.sem_token"], end["clap.audio_projection.sem_token"])
    assert model.config.text_projection
    assert M2D2Processor.from_pretrained(full / "final").feature_extractor.norm_stats == [-9.0, 4.0]

    card = assert_model_card(full / "final", "M2D2ClapModel", "zero-shot-audio-classification", ntt=False)
    assert f"started from `{encoder_dir}`, `{tokenizer_dir}`" in card.text
    classifier = pipeline("zero-shot-audio-classification", model=str(full / "final"))
    wave, rate = sf.read(next((real_sounds_dir / "audio" / "bird").glob("*.flac")), dtype="float32")
    scores = classifier(wave, candidate_labels=["a bird sings", "a dog barks"])
    assert {s["label"] for s in scores} == {"a bird sings", "a dog barks"}


def test_stage_2_1_continues_without_mask(real_sounds_dir, encoder_dir, tokenizer_dir, tmp_path):
    stage2 = tmp_path / "stage2"
    run(common_args(real_sounds_dir, encoder_dir, tokenizer_dir, stage2, 2) + ["--mask_type", "unstructured"])
    stage21 = tmp_path / "stage21"
    args = common_args(real_sounds_dir, encoder_dir, tokenizer_dir, stage21, 2)
    run(args + ["--model_name_or_path", stage2 / "final", "--mask_ratio", 0])
    before, after = M2D2ClapModel.from_pretrained(stage2 / "final"), M2D2ClapModel.from_pretrained(stage21 / "final")
    # It starts from the stage-2 weights (the temperature included) and trains them further.
    assert metrics(stage21)[0]["logit_scale"] == pytest.approx(before.logit_scale.item(), abs=1e-3)
    assert not torch.equal(before.audio_projection.sem_token, after.audio_projection.sem_token)
    assert torch.equal(before.audio_model.layers[0].mlp.fc1.weight, after.audio_model.layers[0].mlp.fc1.weight)


def test_crop_padding_mask_marks_the_audio_columns():
    columns, width = 4, 16
    visible = torch.tensor([[0, 3, 5, 7], [0, 1, 2, 3], [3, 7, 2, 6]])
    # Clip 0: 20 frames of audio in the crop → columns 0 and 1 (the second partly filled, as at inference).
    # Clip 1: longer than the crop. Clip 2: 10 frames, but only columns 2-3 are visible → keeps them all.
    mask = crop_padding_mask(visible, torch.tensor([20, 500, 10]), columns, width)
    assert mask.tolist() == [[True, False, True, False], [True] * 4, [True] * 4]


def test_masked_visible_encoding_equals_encoding_only_the_audio():
    torch.manual_seed(0)
    encoder = M2D2AudioModel(M2D2AudioConfig(**TINY_AUDIO)).eval()
    patches = encoder.embeddings(torch.randn(2, 80, 208))
    visible = torch.tensor([[0, 4, 13, 20, 30], [1, 2, 15, 16, 40]])
    keep = torch.tensor([[True, False, True, True, False], [True, True, True, True, True]])
    with torch.no_grad():
        masked = encoder.encode_visible(patches, visible, keep)
        for row in range(2):
            alone = encoder.encode_visible(patches[row : row + 1], visible[row : row + 1, keep[row]])
            expected = torch.cat([alone[0, :1], alone[0, 1:]])
            torch.testing.assert_close(masked[row, 1:][keep[row]], expected[1:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(masked[row, 0], expected[0], rtol=1e-5, atol=1e-5)


def test_projection_dim_needs_the_mlp_projector(encoder_dir, tokenizer_dir):
    def settings(**options) -> Stage2Settings:
        return Stage2Settings(audio_model=str(encoder_dir), text_model=str(tokenizer_dir), crop_frames=208, **options)

    with pytest.raises(ValueError, match="needs --audio_projector_type mlp"):
        build_model(settings(projection_dim=384))
    model, _ = build_model(settings(audio_projector_type="mlp", projection_dim=384))
    assert model.audio_projection.fc2.out_features == 384 and not model.config.text_projection
    with pytest.raises(ValueError, match="semantic audio projector keeps the encoder width"):
        M2D2Config(audio_config=model.config.audio_config, text_config=model.config.text_config, projection_dim=384)


def test_frozen_text_tower_mlp_projector_and_hidden_padding(real_sounds_dir, encoder_dir, tokenizer_dir, tmp_path):
    """The demo recipe's stage-2 settings: the text tower keeps its weights, the projector maps into its space."""
    output = tmp_path / "frozen_text"
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    run(common_args(real_sounds_dir, encoder_dir, tokenizer_dir, output, 2)
        + ["--freeze_text_model", "--audio_projector_type", "mlp", "--projection_dim", 384, "--mask_padding",
           "--text_pooling", "mean", "--crop_frames", 96, "--checkpointing_steps", 1])  # fmt: skip
    model = M2D2ClapModel.from_pretrained(output / "final")
    text_tower = AutoModel.from_pretrained(tokenizer_dir)
    for name, tensor in text_tower.state_dict().items():
        assert torch.equal(model.text_model.state_dict()[name], tensor), name
    assert model.config.audio_projector_type == "mlp" and isinstance(model.text_projection, torch.nn.Identity)
    assert model.audio_projection.fc2.weight.shape == (384, 32)
    first, second = (load_file(output / f"step_{step}" / "model.safetensors") for step in (1, 2))
    assert not torch.equal(first["clap.audio_projection.fc2.weight"], second["clap.audio_projection.fc2.weight"])
    assert all(np.isfinite(m["loss"]) for m in metrics(output))
