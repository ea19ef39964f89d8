"""Stage-1.1 fine-tuning (`examples/finetune_audio_classification.py`) on real clips with a tiny encoder: the loss
falls, the export loads in the audio-classification pipeline, a longer crop recomputes the positional table, a
resumed run logs the uninterrupted run's losses, multi-label CSV labels give an mAP, mixup changes the loss; and the
pieces (labels, mixup, masks, layer decay, schedule, eval crops) checked in-process."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from transformers import pipeline

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2ForAudioClassification
from m2d2_hf.modeling_m2d2 import resized_position_table, sincos_position_table
from m2d2_hf.training import finetune
from m2d2_hf.training.optim import timm_cosine_lambda
from tests.conftest import TINY_AUDIO
from tests.test_model_card import assert_model_card


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "finetune_audio_classification.py"
LABELS = ["speech_digit", "wild_animal"]
CROP = 304  # > TINY_AUDIO's 208-frame chunk: the grid grows from 5x13 to 5x19 patches


def run(args: list, processes: int = 1, timeout: int = 120) -> str:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    command = [sys.executable]
    if processes > 1:
        # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
        command += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    result = subprocess.run(
        command + [str(SCRIPT)] + [str(a) for a in args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(output_dir) if "loss" in m}


def evaluations(output_dir: Path) -> dict[int, dict]:
    return {m["step"]: m for m in metrics(output_dir) if "eval_clips" in m}


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("encoder")
    M2D2AudioModel(M2D2AudioConfig(**TINY_AUDIO)).save_pretrained(folder)
    return folder


def base_args(encoder_dir: Path, data: Path, output_dir: Path, steps: int) -> list:
    """Small, fast and learnable: two distinct labels, 4-s clips, no mixup or spectrogram masks."""
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    return [
        "--model_name_or_path", encoder_dir, "--train_data", data, "--output_dir", output_dir,
        "--max_train_steps", steps, "--global_batch_size", 8, "--per_device_train_batch_size", 8,
        "--crop_frames", CROP, "--max_seconds", 4, "--logging_steps", 1, "--dataloader_num_workers", 1,
        "--shuffle_buffer", 1000, "--mixup", 0, "--freq_mask", 0, "--time_mask", 0, "--learning_rate", 0.05,
        "--filter", "split=train",
    ]  # fmt: skip


# Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
SINGLE_EXTRA = ["--labels", ",".join(LABELS), "--eval_filter", "split=test", "--eval_steps", 10,
                "--checkpointing_steps", 10]  # fmt: skip


@pytest.fixture(scope="module")
def single_run(encoder_dir, real_sounds_dir, tmp_path_factory) -> tuple[Path, str]:
    """30 steps of single-label fine-tuning (patch mask 0.5 on), a checkpoint and an evaluation every 10."""
    out = tmp_path_factory.mktemp("single") / "run"
    stderr = run(base_args(encoder_dir, real_sounds_dir, out, 30) + SINGLE_EXTRA)
    return out, stderr


def test_training_loss_decreases_and_evaluation_is_logged(single_run):
    out, _ = single_run
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 31))
    first, last = np.mean([losses[s] for s in range(1, 6)]), np.mean([losses[s] for s in range(21, 31)])
    assert last < 0.5 * first, (first, last, losses)
    evals = evaluations(out)
    assert sorted(evals) == [10, 20, 30]
    # real_sounds' test split holds 15 speech_digit and 6 wild_animal clips; every other label is left out.
    assert all(e["eval_clips"] == 21 for e in evals.values())
    assert all(0.0 <= e["eval_accuracy"] <= 1.0 and "eval_map" not in e for e in evals.values())
    assert evals[30]["eval_accuracy"] > 0.8, evals
    assert (out / "step_10").is_dir() and (out / "step_30").is_dir()


def test_export_loads_in_audio_classification_pipeline(single_run, real_sounds_dir):
    out, _ = single_run
    assert_model_card(out / "final", "M2D2ForAudioClassification", "audio-classification", ntt=False)
    classifier = pipeline("audio-classification", model=str(out / "final"))
    assert isinstance(classifier.model, M2D2ForAudioClassification)
    assert classifier.model.config.id2label == dict(enumerate(LABELS))
    assert classifier.model.config.problem_type == "single_label_classification"
    audio, rate = sf.read(
        str(real_sounds_dir / "audio/alarm/fd_alarm_clock_elapsed.flac"), dtype="float32", always_2d=True
    )
    predictions = classifier({"raw": audio.mean(1), "sampling_rate": rate}, top_k=5)
    assert {p["label"] for p in predictions} == set(LABELS)
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-5)  # softmax


def test_longer_crop_recomputes_the_position_table(single_run):
    out, stderr = single_run
    model = M2D2ForAudioClassification.from_pretrained(out / "final")
    assert model.config.chunk_frames == CROP and model.config.time_patches == CROP // 16
    expected = sincos_position_table(TINY_AUDIO["hidden_size"], 5, CROP // 16)[None]
    assert torch.equal(model.audio_model.embeddings.position_embeddings, expected)
    assert "recomputed" in stderr and "5x13 → 5x19" in stderr


def test_resume_reproduces_the_uninterrupted_run(single_run, encoder_dir, real_sounds_dir, tmp_path):
    out, _ = single_run
    resumed = tmp_path / "resumed"
    run(
        base_args(encoder_dir, real_sounds_dir, resumed, 30)
        + SINGLE_EXTRA
        + ["--resume_from_checkpoint", out / "step_10"]
    )
    full, again = train_losses(out), train_losses(resumed)
    assert sorted(again) == list(range(11, 31))
    assert all(again[s] == full[s] for s in again), [(s, full[s], again[s]) for s in again if again[s] != full[s]]
    assert evaluations(resumed) == {s: e for s, e in evaluations(out).items() if s > 10}
    a, b = load_file(out / "step_30" / "model.safetensors"), load_file(resumed / "step_30" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mixup_changes_the_loss(single_run, encoder_dir, real_sounds_dir, tmp_path):
    out, _ = single_run
    mixed = tmp_path / "mixup"
    run(base_args(encoder_dir, real_sounds_dir, mixed, 2) + ["--labels", ",".join(LABELS), "--mixup", 0.5])
    # Same weights, crops and patch masks at step 1 (lr 0 during warm-up does not matter: the step-1 loss is taken
    # before any update); only the mixing differs.
    assert train_losses(mixed)[1] != pytest.approx(train_losses(out)[1], abs=1e-4)


def test_two_processes_share_labels_and_evaluate_every_clip_once(encoder_dir, real_sounds_dir, tmp_path):
    out = tmp_path / "two"
    args = base_args(encoder_dir, real_sounds_dir, out, 4) + [
        "--per_device_train_batch_size",
        4,
        "--eval_filter",
        "split=test",
        "--eval_steps",
        0,
    ]
    stderr = run(args, processes=2)
    # The label pass runs on the main process only; the other process trains with the labels it broadcasts.
    assert "label pass: 22 labels" in stderr
    evals = evaluations(out)
    # Each process scores its own shards of the 60 test clips; the metric covers all of them once.
    assert list(evals) == [4] and evals[4]["eval_clips"] == 60
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    assert len(M2D2ForAudioClassification.from_pretrained(out / "final").config.id2label) == 22


@pytest.fixture(scope="module")
def multi_label_dir(real_sounds_dir, tmp_path_factory) -> Path:
    """An audiofolder whose metadata.csv points at real_sounds clips with ';'-joined label strings."""
    names = {
        "speech_digit": "speech;digit",
        "speech_letter": "speech;letter",
        "wild_animal": "animal",
        "bird": "animal;bird",
    }
    with open(real_sounds_dir / "metadata.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["label"] in names]
    chosen = [r for r in rows if r["split"] == "train"][::3] + [r for r in rows if r["split"] == "test"]
    folder = tmp_path_factory.mktemp("multi_label")
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "tags", "split"])
        writer.writerows([str(real_sounds_dir / r["file_name"]), names[r["label"]], r["split"]] for r in chosen)
    return folder


def test_multi_label_lists_give_map(encoder_dir, multi_label_dir, tmp_path):
    out = tmp_path / "multi"
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    stderr = run(base_args(encoder_dir, multi_label_dir, out, 6) + [
        "--label_column", "tags", "--label_separator", ";", "--eval_filter", "split=test", "--eval_steps", 3,
        "--training_mask", 0, "--mixup", 0.5,
    ])  # fmt: skip
    assert "label pass: 5 labels" in stderr
    evals = evaluations(out)
    assert sorted(evals) == [3, 6]
    for values in evals.values():
        assert 0.0 < values["eval_map"] <= 1.0 and "eval_accuracy" not in values
        assert values["eval_clips"] == 15 + 6 + 6 + 3
    model = M2D2ForAudioClassification.from_pretrained(out / "final")
    assert model.config.problem_type == "multi_label_classification"
    assert list(model.config.id2label.values()) == ["animal", "bird", "digit", "letter", "speech"]
    assert all(math.isfinite(v) for v in train_losses(out).values())


# ------------------------------------------------------------------------------------------------------------------
# The pieces, in-process
# ------------------------------------------------------------------------------------------------------------------


def test_label_reader_and_targets():
    single = finetune.LabelReader("label", multi_label=False, separator=None)
    assert single.names("dog") == ["dog"] and single.names(3) == ["3"] and single.names(None) == []
    with pytest.raises(ValueError, match="--multi_label"):
        single.names(["a", "b"])
    multi = finetune.LabelReader("label", multi_label=True, separator=";")
    assert multi.names("a; b;") == ["a", "b"] and multi.names(["x", "y"]) == ["x", "y"]
    assert multi.names(np.array(["x"])) == ["x"]
    label2id = {"a": 0, "b": 1, "c": 2}
    targets = finetune.targets_of(["a;c", "b;unknown", ["c"]], multi, label2id)
    assert torch.equal(targets, torch.tensor([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]]))

    keep = finetune.LabelledRows(multi, ["a"], base_filter=lambda row: row["split"] == "train")
    assert keep({"label": "a;z", "split": "train"}) and not keep({"label": "a", "split": "test"})
    assert not keep({"label": "z", "split": "train"}) and not keep({"label": None, "split": "train"})
    assert keep.left_out == 2


def test_mixup_mixes_inputs_and_targets_alike():
    log_mel = torch.randn(6, 4, 10)
    targets = torch.eye(6)  # one class per clip: the soft targets reveal each clip's λ and partner
    mixed, soft = finetune.mixup(log_mel, targets, 0.5, torch.Generator().manual_seed(1))
    again, _ = finetune.mixup(log_mel, targets, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(mixed, again) and not torch.allclose(mixed, log_mel)
    assert torch.allclose(soft.sum(1), torch.ones(6))
    lams = []
    for i in range(6):
        lam = soft[i, i]
        partner = i if lam == 1 else int(torch.cat([soft[i, :i], torch.zeros(1), soft[i, i + 1 :]]).argmax())
        assert torch.allclose(mixed[i], lam * log_mel[i] + (1 - lam) * log_mel[partner], atol=1e-6)
        lams.append(float(lam))
    assert len(set(lams)) > 1  # one λ per clip


def test_spectrogram_masks_are_shared_by_the_batch_and_seeded():
    features = torch.ones(3, 80, 300)
    masked = finetune.spec_masks(features, 30, 192, torch.Generator().manual_seed(0))
    assert torch.equal(masked, finetune.spec_masks(features, 30, 192, torch.Generator().manual_seed(0)))
    assert all(torch.equal(masked[0], masked[i]) for i in range(3))
    zero_rows = (masked[0] == 0).all(1).sum()
    zero_columns = (masked[0] == 0).all(0).sum()
    assert zero_rows < 30 and zero_columns < 192 and (zero_rows + zero_columns) > 0
    state = torch.get_rng_state()
    finetune.spec_masks(features, 30, 192, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    assert finetune.spec_masks(features, 0, 0, torch.Generator()) is features


def test_head_crops_zero_pad_in_raw_log_mel_space():
    log_mel = torch.arange(2 * 2 * 6, dtype=torch.float32).reshape(2, 2, 6) + 1
    crops = finetune.head_log_mel_crops(log_mel, torch.tensor([6, 3]), 8)
    assert crops.shape == (2, 2, 8)
    assert torch.equal(crops[0, :, :6], log_mel[0]) and (crops[0, :, 6:] == 0).all()
    assert torch.equal(crops[1, :, :3], log_mel[1, :, :3]) and (crops[1, :, 3:] == 0).all()


def test_layer_decay_groups_and_schedule():
    config = M2D2AudioConfig(**TINY_AUDIO, num_labels=3)
    model = M2D2ForAudioClassification(config)
    groups = finetune.parameter_groups(model, 1.0, 0.05, 0.5)
    levels = {}
    for group in groups:
        for parameter in group["params"]:
            name = next(n for n, p in model.named_parameters() if p is parameter)
            levels[name] = (group["lr"], group["weight_decay"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    layers = TINY_AUDIO["num_hidden_layers"]
    assert levels["classifier.weight"] == (1.0, 0.05) and levels["classifier.bias"] == (1.0, 0.0)
    assert levels["audio_model.layernorm.weight"] == (1.0, 0.0)
    assert levels["audio_model.layers.1.mlp.fc1.weight"][0] == 0.5 ** (layers - 1)
    assert levels["audio_model.layers.0.mlp.fc1.weight"][0] == 0.5**layers
    assert levels["audio_model.embeddings.cls_token"] == (0.5 ** (layers + 1), 0.05)
    assert groups[0]["lr"] == 1.0  # the logged lr is the head's
    # timm's cosine (warmup_prefix False): linear warm-up, then the cosine of the whole run's progress.
    schedule = timm_cosine_lambda(15, 70, 0.0)
    assert schedule(0) == 0 and schedule(5) == pytest.approx(5 / 15)
    assert schedule(15) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 70)))
    assert schedule(70) == pytest.approx(0.0)


def test_build_model_extends_or_keeps_the_grid(encoder_dir):
    encoder = M2D2AudioModel.from_pretrained(encoder_dir)
    stored = encoder.embeddings.position_embeddings

    def args(crop, table="recompute"):
        return finetune.FinetuneSettings(
            model_name_or_path=str(encoder_dir), crop_frames=crop, position_table=table, multi_label=True
        )

    same = finetune.build_model(args(160), ["a", "b"])  # shorter crops use the table's first columns
    assert same.config.chunk_frames == 208 and torch.equal(same.audio_model.embeddings.position_embeddings, stored)
    assert torch.equal(same.audio_model.layers[0].mlp.fc1.weight, encoder.layers[0].mlp.fc1.weight)
    assert same.config.problem_type == "multi_label_classification" and same.config.label2id == {"a": 0, "b": 1}
    resized = finetune.build_model(args(CROP, "bicubic"), ["a"])
    table = resized.audio_model.embeddings.position_embeddings
    assert table.shape == (1, 1 + 5 * 19, TINY_AUDIO["hidden_size"])
    assert torch.equal(table[0, 0], stored[0, 0])
    # A bicubic resize to the same grid is the identity (align_corners False samples the very grid points).
    assert torch.allclose(resized_position_table(stored, 5, 13, 13), stored, atol=1e-6)
    assert not torch.allclose(table, sincos_position_table(TINY_AUDIO["hidden_size"], 5, 19)[None], atol=1e-3)
