"""The stage-1 training program end to end on real clips with a tiny config: two connected CPU processes with a
global contrastive batch, step-exact resume, skipped broken items, caption-less clips, loss decrease, export."""

import csv
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoFeatureExtractor, AutoModel

from m2d2_hf import M2D2AudioModel, cpu_inference
from m2d2_hf.cpu_inference import cpu_has_native_bf16
from m2d2_hf.training.captions import write_embedding_shard
from m2d2_hf.training.loop import refuse_emulated_bf16
from m2d2_hf.training.stage1 import training_attention

from .test_cpu_inference import AVX2_ONLY, AVX512_BF16, simulate_cpu
from .test_model_card import assert_model_card


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "pretrain_stage1.py"
TINY = (
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,predictor_hidden_size=16,"
    "predictor_num_hidden_layers=1,predictor_num_attention_heads=2,predictor_intermediate_size=32,"
    "projector_intermediate_size=32"
)


def run(args: list, processes: int = 1, timeout: int = 300, **env_overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env_overrides)
    if processes == 1:
        command = [sys.executable, str(SCRIPT)]
    else:
        accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
        # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
        command = accelerate + ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                                "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)]  # fmt: skip
    result = subprocess.run(
        command + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_dir(real_sounds_dir, tmp_path_factory) -> Path:
    """An audiofolder of 24 real train clips, a corrupted file and an empty file."""
    folder = tmp_path_factory.mktemp("stage1_data")
    with open(real_sounds_dir / "metadata.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train"][::8][:24]
    for row in rows:
        target = folder / Path(row["file_name"]).name
        shutil.copy(real_sounds_dir / row["file_name"], target)
    (folder / "corrupted.flac").write_bytes(b"fLaC this is not audio" * 10)
    (folder / "empty.wav").write_bytes(b"")
    names = [Path(r["file_name"]).name for r in rows] + ["corrupted.flac", "empty.wav"]
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "caption"])
        writer.writerows([name, f"caption of {name}"] for name in names)
    return folder


@pytest.fixture(scope="module")
def captions_dir(data_dir, tmp_path_factory) -> Path:
    """Random 24-d caption embeddings (1-3 per clip) for all clips but four: those train without the CLAP term."""
    rng = np.random.default_rng(0)
    stems = sorted(p.stem for p in data_dir.glob("*.flac") if p.stem != "corrupted")[4:]
    folder = tmp_path_factory.mktemp("captions")
    embeddings = {s: rng.standard_normal((1 + len(s) % 3, 24)) for s in stems}
    write_embedding_shard(folder / "shard-00000.parquet", embeddings)
    return folder


def common_args(data_dir: Path, output_dir: Path, steps: int) -> list:
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    return [
        "--train_data", data_dir, "--output_dir", output_dir, "--max_train_steps", steps, "--global_batch_size", 8,
        "--config_overrides", TINY, "--norm_stats_crops", 16, "--logging_steps", 1, "--dataloader_num_workers", 1,
        "--shuffle_buffer", 16, "--base_learning_rate", 0.05,
    ]  # fmt: skip


def test_two_processes_resume_exactly(data_dir, captions_dir, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = ["--per_device_train_batch_size", 2, "--checkpointing_steps", 2, "--caption_embeddings", captions_dir]
    run(common_args(data_dir, full, 4) + args, processes=2)
    history = metrics(full)
    assert [m["step"] for m in history] == [1, 2, 3, 4]
    assert all(m["clap_loss"] > 0 for m in history), history
    assert (full / "step_2").is_dir() and (full / "step_4").is_dir()
    run(common_args(data_dir, resumed, 4) + args + ["--resume_from_checkpoint", full / "step_2"], processes=2)
    again = metrics(resumed)
    assert [m["step"] for m in again] == [3, 4]
    for expected, got in zip(history[2:], again):
        for key in ("loss", "m2d_loss", "clap_loss", "lr", "ema_decay", "logit_scale"):
            assert got[key] == expected[key], (key, expected, got)
    # The resumed run ends with the very weights of the uninterrupted one.
    a, b = load_file(full / "step_4" / "model.safetensors"), load_file(resumed / "step_4" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_single_process_run_learns_skips_broken_items_and_exports(data_dir, captions_dir, tmp_path):
    out = tmp_path / "run"
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    args = ["--per_device_train_batch_size", 8, "--checkpointing_steps", 1000, "--caption_embeddings", captions_dir,
            "--warmup_ratio", 0.1]  # fmt: skip
    run(common_args(data_dir, out, 30) + args)
    history = metrics(out)
    first, last = np.mean([m["loss"] for m in history[:5]]), np.mean([m["loss"] for m in history[-5:]])
    assert last < 0.8 * first, (first, last)
    # Three passes over 26 items with two broken ones: each pass skips and counts both, the run goes on.
    assert history[-1]["skipped_items"] >= 2 and history[-1]["skipped_items"] % 2 == 0
    assert 0 <= history[-1]["logit_scale"] <= np.log(100) + 1e-6
    encoder = AutoModel.from_pretrained(out / "final")
    assert isinstance(encoder, M2D2AudioModel)
    feature_extractor = AutoFeatureExtractor.from_pretrained(out / "final")
    assert feature_extractor.norm_stats[1] > 0 and encoder.config.chunk_frames == 608
    saved = json.loads((out / "final" / "config.json").read_text())  # written once, to the feature extractor
    assert "norm_stats" not in saved and "mask_ratio" not in saved
    config = json.loads((out / "run_config.json").read_text())
    assert config["max_train_steps"] == 30
    card = assert_model_card(out / "final", "M2D2AudioModel", None, ntt=False)
    assert "`examples/pretrain_stage1.py` after 30 of 30 optimiser steps" in card.text and "new weights" in card.text


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="bf16 training needs a CPU with avx512_bf16 or amx_bf16")
def test_bf16_autocast_on_the_cpu_trains_with_eager_attention_and_exports_a_plain_folder(data_dir, tmp_path):
    out = tmp_path / "bf16"
    args = common_args(data_dir, out, 3) + ["--per_device_train_batch_size", 8]
    result = run(args, ACCELERATE_MIXED_PRECISION="bf16")
    assert "attention kernel: eager (bf16 precision)" in result.stderr
    if platform.libc_ver()[0] == "glibc":
        assert "glibc malloc keeps freed tensor memory mapped" in result.stderr
    assert all(np.isfinite(m["loss"]) for m in metrics(out))
    # The kernel is a choice of this run, not of the exported encoder: it loads with the default (SDPA).
    assert "attn_implementation" not in (out / "final" / "config.json").read_text()
    assert AutoModel.from_pretrained(out / "final").config._attn_implementation == "sdpa"


def test_a_run_without_caption_embeddings_says_it_trains_without_the_clap_term(data_dir, tmp_path):
    result = run(common_args(data_dir, tmp_path / "m2d_only", 1) + ["--per_device_train_batch_size", 8])
    assert "no --caption_embeddings: this run trains the M2D objective alone, without stage 1's CLAP term" in (
        result.stderr
    )


@pytest.mark.parametrize("flags", [AVX2_ONLY, AVX512_BF16])
def test_bf16_training_is_refused_where_the_cpu_would_emulate_it(flags, monkeypatch):
    simulate_cpu(monkeypatch, flags)
    native = cpu_inference.cpu_has_native_bf16()
    for device, mixed_precision in (("cpu", "bf16"), ("cpu", "no"), ("cuda", "bf16")):
        accelerator = SimpleNamespace(device=torch.device(device), mixed_precision=mixed_precision)
        if device == "cpu" and mixed_precision == "bf16" and not native:
            with pytest.raises(ValueError, match="would run emulated.*--mixed_precision no"):
                refuse_emulated_bf16(accelerator)
        else:
            refuse_emulated_bf16(accelerator)


@pytest.mark.parametrize(
    ("device", "mixed_precision", "expected"),
    [("cpu", "bf16", "eager"), ("cpu", "no", "sdpa"), ("cpu", "fp16", "sdpa"), ("cuda", "bf16", "sdpa")],
)
def test_training_attention_is_eager_only_for_bf16_on_the_cpu(device, mixed_precision, expected):
    assert training_attention(torch.device(device), mixed_precision) == expected


def test_a_stream_of_only_broken_items_stops_with_a_clear_error():
    from m2d2_hf.training.loop import BatchStream

    empty = {"waveforms": torch.zeros(0, 0), "lengths": torch.zeros(0), "ids": [], "num_skipped": 4}
    loader = torch.utils.data.DataLoader([0, 1], batch_size=1, collate_fn=lambda items: empty)
    stream = iter(BatchStream(loader))
    with pytest.raises(RuntimeError, match="every item of the training stream was skipped"):
        for _ in range(3):
            next(stream)
