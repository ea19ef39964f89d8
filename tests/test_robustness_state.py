"""Robustness of the state the package writes and reads: checkpoints that run no code and are never
used half-written, resumes that follow a new schedule and keep one metrics history, training that says what
happens (audio too loud for float32 spectra skipped, non-finite steps stopped or skipped, nothing non-finite
written), and a converter whose output appears whole or not at all, with clear errors.

The training runs are tiny stage-1 runs forked from one process that imported the package once
(`tests/training_runner.py`), so that killing runs and resuming them stays cheap."""

import argparse
import ast
import csv
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModel
from transformers.utils import ModelOutput

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2FeatureExtractor, cli
from m2d2_hf.conversion import convert_checkpoint
from m2d2_hf.evaluation import load_evaluation_set
from m2d2_hf.training import loop
from m2d2_hf.training.arguments import TrainingSettings
from m2d2_hf.training.captions import CaptionEmbeddingTable, CaptionEncoder, cached_ids, write_embedding_shard
from m2d2_hf.training.checkpoint import COMPLETE_MARKER, require_finite, resolve_checkpoint
from m2d2_hf.training.data import load_audio_stream
from m2d2_hf.training.finetune import load_encoder

from . import original_layout as layout
from .conftest import TINY_AUDIO


REPO_ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,predictor_hidden_size=16,"
    "predictor_num_hidden_layers=1,predictor_num_attention_heads=2,predictor_intermediate_size=32,"
    "projector_intermediate_size=32"
)
STEPS = 4
CLIPS = 8


class Payload:
    """A pickle that, when unpickled, creates `marker`: what a replaced checkpoint file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class Runner:
    """The test side of `training_runner.py`."""

    def __init__(self):
        env = dict(os.environ, ACCELERATE_USE_CPU="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "tests" / "training_runner.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO_ROOT,
        )

    def start(self, argv: list, log: Path, save_delay: float = 0.0, program: str = "stage1") -> int:
        request = {"program": program, "argv": [str(a) for a in argv], "log": str(log), "save_delay": save_delay}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["pid"]

    def wait(self) -> int:
        return json.loads(self.process.stdout.readline())["returncode"]

    def run(self, argv: list, log: Path, program: str = "stage1") -> tuple[int, str]:
        self.start(argv, log, program=program)
        code = self.wait()
        return code, log.read_text()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def runner():
    runner = Runner()
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def data_dir(real_sounds_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("robust_data")
    with open(real_sounds_dir / "metadata.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["split"] == "train"][::8][:CLIPS]
    for row in rows:
        shutil.copy(real_sounds_dir / row["file_name"], folder / Path(row["file_name"]).name)
    return folder


def stage1_args(data_dir: Path, output_dir: Path, steps: int = STEPS) -> list:
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    return [
        "--train_data", data_dir, "--output_dir", output_dir, "--max_train_steps", steps, "--global_batch_size", 4,
        "--per_device_train_batch_size", 4, "--config_overrides", TINY, "--norm_stats", 0, 1, "--logging_steps", 1,
        "--dataloader_num_workers", 0, "--shuffle_buffer", 0, "--checkpointing_steps", 1, "--crop_frames", 64,
        "--min_seconds", 0.7, "--max_seconds", 1, "--base_learning_rate", 0.05,
    ]  # fmt: skip


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def same_weights(a: Path, b: Path) -> bool:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.fixture(scope="module")
def baseline(runner, data_dir, tmp_path_factory) -> Path:
    """An uninterrupted run, checkpointed at every step."""
    out = tmp_path_factory.mktemp("baseline") / "run"
    code, log = runner.run(stage1_args(data_dir, out), out.parent / "log.txt")
    assert code == 0, log[-3000:]
    assert all((out / f"step_{s}" / COMPLETE_MARKER).is_file() for s in range(1, STEPS + 1))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Security: a checkpoint folder runs no code
# ---------------------------------------------------------------------------------------------------------------------


def test_a_payload_in_any_checkpoint_file_runs_no_code_and_names_the_file(runner, baseline, data_dir, tmp_path):
    names = sorted(p.name for p in (baseline / "step_2").iterdir())
    assert names == sorted(
        [
            COMPLETE_MARKER,
            "model.safetensors",
            "optimizer.safetensors",
            "rng_state_0.safetensors",
            "trainer_state.json",
        ]
    )  # no pickle is written
    for name in names:
        out = tmp_path / name
        shutil.copytree(baseline / "step_2", out / "step_2")
        marker = tmp_path / f"ran_{name}"
        (out / "step_2" / name).write_bytes(pickle.dumps(Payload(marker)))
        code, log = runner.run(stage1_args(data_dir, out) + ["--resume_from_checkpoint", "latest"], tmp_path / "log")
        assert not marker.exists(), f"the payload in {name} ran"
        assert code != 0 and "CheckpointError" in log and str(out / "step_2" / name) in log, log[-2000:]


def test_pickles_of_accelerate_checkpoints_are_never_loaded(runner, baseline, data_dir, tmp_path):
    """What accelerate's save_state writes (and loaded with weights_only=False) is ignored beside a checkpoint, and
    an accelerate-style folder is refused or skipped, never read."""
    pickles = [
        "custom_checkpoint_0.pkl",
        "custom_checkpoint_1.pkl",
        "custom_checkpoint_2.pkl",
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "pytorch_model.bin",
        "sampler.bin",
        "scaler.pt",
    ]
    marker = tmp_path / "ran"
    out = tmp_path / "run"
    shutil.copytree(baseline / "step_2", out / "step_2")
    (out / "step_3").mkdir()
    for folder in (out / "step_2", out / "step_3"):
        for name in pickles:
            (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    code, log = runner.run(stage1_args(data_dir, out) + ["--resume_from_checkpoint", out / "step_3"], tmp_path / "a")
    assert code != 0 and f"has no {COMPLETE_MARKER}" in log and "earlier version" in log, log[-2000:]
    code, log = runner.run(stage1_args(data_dir, out) + ["--resume_from_checkpoint", "latest"], tmp_path / "b")
    assert code == 0, log[-2000:]
    assert f"ignoring {out / 'step_3'}" in log and "resumed from" in log and "step_2 at step 2" in log
    assert not marker.exists()
    assert same_weights(baseline / f"step_{STEPS}", out / f"step_{STEPS}")


def test_converter_refuses_payloads_even_inside_allowed_types(tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = tmp_path / "m2d_vit_base-80x208p16x16-240101"
    folder.mkdir()
    cases = {
        "payload.pth": Payload(marker),
        "in_args.pth": {"model": layout.encoder_state(), "args": argparse.Namespace(seed=Payload(marker))},
        "in_state.pth": {"model": {**layout.encoder_state(), "cls_token": Payload(marker)}},
    }
    for name, value in cases.items():
        torch.save(value, folder / name)
    (folder / "bare.pth").write_bytes(pickle.dumps(Payload(marker)))  # a plain pickle, not torch's zip format
    for name in [*cases, "bare.pth"]:
        with pytest.raises(ValueError, match=rf"{name} could not be read with torch.load\(weights_only=True\)"):
            convert_checkpoint(folder / name, tmp_path / "out")
    assert "weights_only=True" in cli_error(capsys, [folder / "in_args.pth", tmp_path / "out"])
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_model_folders_load_no_pickled_weights(tmp_path):
    """Exports, fine-tuning and stage-2 inputs and converted models load through from_pretrained, which reads a
    pytorch_model.bin with weights_only=True."""
    marker = tmp_path / "ran"
    config = M2D2AudioConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.save_pretrained(tmp_path / "model")
    torch.save(Payload(marker), tmp_path / "model" / "pytorch_model.bin")
    for load in (load_encoder, AutoModel.from_pretrained, M2D2AudioModel.from_pretrained):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            load(str(tmp_path / "model"))
    assert not marker.exists()


def test_caption_tables_read_no_pickles(tmp_path):
    """A shard whose embedding bytes, extension type and schema metadata are pickles is read as numbers."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    marker = tmp_path / "ran"
    blob = pickle.dumps(Payload(marker))
    blob += b"." * (len(blob) % 2)  # whole float16 values
    embeddings = pa.field(
        "embeddings",
        pa.binary(),
        # The pickled extension type that pyarrow < 14.0.1 unpickled on read.
        metadata={"ARROW:extension:name": "arrow.py_extension_type", "ARROW:extension:metadata": blob},
    )
    schema = pa.schema(
        [pa.field("id", pa.string()), embeddings, pa.field("num_captions", pa.int64()), pa.field("dim", pa.int64())],
        metadata={"pickle": blob},
    )
    folder = tmp_path / "captions"
    folder.mkdir()
    columns = {"id": ["clip"], "embeddings": [blob], "num_captions": [1], "dim": [len(blob) // 2]}
    pq.write_table(pa.table(columns, schema=schema), folder / "shard-00000.parquet")
    table = CaptionEmbeddingTable.from_path(folder)
    assert table["clip"].shape == (1, len(blob) // 2) and cached_ids(folder) == {"clip"}
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pyd", "pickle", "npy", "pth"])
def test_training_shards_decode_no_pickles(data_dir, tmp_path, kind):
    """WebDataset members that hold pickles are kept as bytes (.pyd, .pickle) or refused by datasets' decoders
    (.npy without allow_pickle, .pth with weights_only): no code runs."""
    marker = tmp_path / "ran"
    member = io.BytesIO()
    if kind == "npy":
        np.save(member, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    elif kind == "pth":
        torch.save(Payload(marker), member)
    else:
        member.write(pickle.dumps(Payload(marker)))
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        clip = min(data_dir.glob("*.flac")).read_bytes()
        for name, data in (("clip.flac", clip), (f"clip.{kind}", member.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    if kind in ("pyd", "pickle"):
        (item,) = list(load_audio_stream(str(shard), shuffle_buffer=0))
        assert item["id"] == "clip" and item["audio"].size > 0 and not item["error"]
    else:  # datasets decodes the first items already to infer the columns
        with pytest.raises((ValueError, pickle.UnpicklingError), match="allow_pickle=False|Weights only load failed"):
            list(load_audio_stream(str(shard), shuffle_buffer=0))
    assert not marker.exists()


def test_dataset_scripts_never_run(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "dataset.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    with pytest.raises(RuntimeError, match="scripts are no longer supported"):
        load_evaluation_set(str(folder))
    assert list(load_audio_stream(str(folder), shuffle_buffer=0)) == []  # read as an audiofolder without audio
    assert not marker.exists()


def test_remote_code_runs_only_when_asked():
    assert inspect.signature(CaptionEncoder).parameters["trust_remote_code"].default is False
    script = REPO_ROOT / "examples" / "cache_caption_embeddings.py"
    spec = importlib.util.spec_from_file_location("cache_example", script)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.parse_args(["--captions", "c.csv", "--output", "o"]).trust_remote_code is False


# A table: module or call -> what the message calls it (fmt: skip keeps the rows).
UNSAFE = {
    "torch.load": "torch.load without weights_only=True",
    "pickle": "pickle", "dill": "dill", "cloudpickle": "cloudpickle", "joblib": "joblib", "shelve": "shelve",
    "load_state": "accelerate's load_state (weights_only=False for registered objects)",
    "torch.jit.load": "torch.jit.load", "eval": "eval", "exec": "exec",
}  # fmt: skip


def is_true(keywords: dict, key: str) -> bool:
    return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True


def unsafe_loads(source: str) -> list[str]:
    """The calls and imports of `source` that could run code from a file (see UNSAFE), and np.load with
    allow_pickle=True and trust_remote_code=True written as constants."""
    found = []
    for node in ast.walk(ast.parse(source)):
        # Importing only exception classes (`from pickle import UnpicklingError`, to report a refused file) loads
        # nothing; any other import of these modules counts.
        only_errors = isinstance(node, ast.ImportFrom) and all(a.name.endswith("Error") for a in node.names)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and not only_errors:
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            roots = [module.split(".")[0] for module in modules]
            found += [UNSAFE[root] for root in roots if root in ("pickle", "dill", "cloudpickle", "joblib", "shelve")]
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if name == "torch.load" and not is_true(keywords, "weights_only"):
            found.append(UNSAFE["torch.load"])
        if name in ("torch.jit.load", "eval", "exec") or name.endswith(".load_state"):
            found.append(UNSAFE.get(name, UNSAFE["load_state"]))
        if (
            name in ("np.load", "numpy.load")
            and "allow_pickle" in keywords
            and not (isinstance(keywords["allow_pickle"], ast.Constant) and keywords["allow_pickle"].value is False)
        ):
            found.append("np.load(allow_pickle=...)")
        if is_true(keywords, "trust_remote_code"):
            found.append("trust_remote_code=True")
    return found


def test_no_loader_of_the_package_or_its_examples_can_run_code_from_a_file():
    files = sorted((REPO_ROOT / "m2d2_hf").rglob("*.py")) + sorted((REPO_ROOT / "examples").rglob("*.py"))
    assert len(files) > 40
    unsafe = {str(f.relative_to(REPO_ROOT)): found for f in files if (found := unsafe_loads(f.read_text()))}
    assert not unsafe, unsafe
    # The check sees what it must refuse.
    bad = "import pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
    bad += "accelerator.load_state(d)\nAutoModel.from_pretrained(m, trust_remote_code=True)\n"
    bad += "from pickle import load, UnpicklingError\n"
    assert len(unsafe_loads(bad)) == 7
    assert not unsafe_loads("torch.load(p, weights_only=True)\nnp.load(p)\nf(trust_remote_code=flag)\n")
    assert not unsafe_loads("from pickle import UnpicklingError\n")


# ---------------------------------------------------------------------------------------------------------------------
# Crash safety: nothing half-written is ever used
# ---------------------------------------------------------------------------------------------------------------------


def test_runs_killed_during_saves_resume_step_exactly(runner, baseline, data_dir, tmp_path):
    """Each try SIGKILLs a run at a random moment of the save of a random step (every flush of a save sleeps 0.1 s,
    so that the kill lands inside it), resumes from `latest_or_new` (a kill inside the first save leaves no
    checkpoint) and must end with the uninterrupted run's weights and one history of its losses."""
    rng = random.Random(12)
    expected = metrics(baseline)
    for attempt in range(5):
        out = tmp_path / f"try{attempt}"
        step, delay = rng.randint(1, STEPS - 1), rng.uniform(0.0, 0.55)
        pid = runner.start(stage1_args(data_dir, out), tmp_path / f"killed{attempt}", save_delay=0.1)
        partial = out / f".step_{step}.partial"
        deadline = time.monotonic() + 120
        while not partial.exists():
            assert time.monotonic() < deadline, "the save never started"
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(pid, 9)
        assert runner.wait() == -9
        context = f"try {attempt}: killed {delay:.3f} s into the save of step {step}"
        complete = sorted(int(p.name[5:]) for p in out.glob("step_*") if (p / COMPLETE_MARKER).is_file())
        assert sorted(int(p.name[5:]) for p in out.glob("step_*")) == complete, context
        resume = ["--resume_from_checkpoint", "latest_or_new"]
        code, log = runner.run(stage1_args(data_dir, out) + resume, tmp_path / "log")
        assert code == 0, (context, log[-2000:])
        assert same_weights(baseline / f"step_{STEPS}", out / f"step_{STEPS}"), context
        got = [(m["step"], m["loss"]) for m in metrics(out)]
        assert got == [(m["step"], m["loss"]) for m in expected], (context, got)
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], context


# ---------------------------------------------------------------------------------------------------------------------
# Training: say what happens
# ---------------------------------------------------------------------------------------------------------------------


def test_resuming_with_a_larger_max_train_steps_follows_the_new_schedule(runner, baseline, data_dir, tmp_path):
    out = tmp_path / "run"
    code, log = runner.run(stage1_args(data_dir, out, steps=2), tmp_path / "short")
    assert code == 0, log[-2000:]
    code, log = runner.run(stage1_args(data_dir, out) + ["--resume_from_checkpoint", "latest"], tmp_path / "longer")
    assert code == 0, log[-2000:]
    resumed = {m["step"]: m["lr"] for m in metrics(out)[2:]}
    assert resumed == {m["step"]: m["lr"] for m in metrics(baseline)[2:]} and resumed[3] > 0, resumed


def caption_table(folder: Path, ids: list[str]) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir()
    write_embedding_shard(folder / "shard-00000.parquet", {i: rng.standard_normal((2, 24)) for i in ids})
    return folder


def test_captions_that_match_no_clip_stop_stage1_and_every_window_counts_uncaptioned_clips(runner, data_dir, tmp_path):
    stems = sorted(p.stem for p in data_dir.glob("*.flac"))
    foreign = caption_table(tmp_path / "foreign", [f"other_{stem}" for stem in stems])
    args = stage1_args(data_dir, tmp_path / "stopped", steps=2) + ["--caption_embeddings", foreign]
    code, log = runner.run(args, tmp_path / "a")
    assert code != 0 and "none of the 4 clips of the first step has a caption" in log, log[-2000:]
    assert "--allow_uncaptioned" in log and not (tmp_path / "stopped" / "step_1").exists()

    args = stage1_args(data_dir, tmp_path / "allowed", steps=2) + ["--caption_embeddings", foreign]
    code, log = runner.run(args + ["--allow_uncaptioned"], tmp_path / "b")
    assert code == 0, log[-2000:]
    assert [(m["uncaptioned_clips"], m["clap_loss"]) for m in metrics(tmp_path / "allowed")] == [(4, 0.0), (4, 0.0)]

    # Half the clips captioned, windows of two steps = one pass over the 8 clips each: 4 without a caption in
    # every window (the count restarts with each window; a running total would read 4, 8).
    half = caption_table(tmp_path / "half", stems[::2])
    args = stage1_args(data_dir, tmp_path / "half_run", steps=4) + ["--caption_embeddings", half]
    code, log = runner.run(args + ["--logging_steps", 2], tmp_path / "c")
    assert code == 0, log[-2000:]
    logged = metrics(tmp_path / "half_run")
    assert [m["step"] for m in logged] == [2, 4], logged
    assert all(m["uncaptioned_clips"] == CLIPS // 2 and m["clap_loss"] > 0 for m in logged), logged


def test_report_to_a_tracker_that_is_not_installed_stops_before_training(monkeypatch):
    monkeypatch.setattr(loop, "get_available_trackers", lambda: [])
    with pytest.raises(ValueError, match=r"tensorboard package is not installed.*m2d2-hf\[train\]"):
        loop.tracker_names("jsonl,tensorboard")
    with pytest.raises(ValueError, match="wandb package is not installed.*pip install wandb"):
        loop.tracker_names("wandb")
    with pytest.raises(ValueError, match="'tensorbord' is not a tracker"):
        loop.tracker_names("tensorbord")
    assert loop.tracker_names("jsonl, none,all") == ["jsonl", "all"]
    monkeypatch.setattr(loop, "get_available_trackers", lambda: [loop.LoggerType.TENSORBOARD])
    assert loop.tracker_names("jsonl,tensorboard") == ["jsonl", "tensorboard"]
    # build_accelerator checks the trackers first: nothing is created, not even the output folder.
    monkeypatch.setattr(loop, "get_available_trackers", lambda: [])
    settings = TrainingSettings(train_data="x", output_dir="/nonexistent/out", max_train_steps=1, report_to="wandb")
    with pytest.raises(ValueError, match="wandb"):
        loop.build_accelerator(settings)
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    assert "tensorboard" in setup["options.extras_require"]["train"].split()


def test_a_resumed_run_keeps_one_history_in_metrics_jsonl(runner, baseline, data_dir, tmp_path):
    """Resuming at step 2 in the folder of a 4-step run drops the lines of steps 3 and 4, which it logs again."""
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    code, log = runner.run(stage1_args(data_dir, out) + ["--resume_from_checkpoint", out / "step_2"], tmp_path / "a")
    assert code == 0, log[-2000:]
    assert "dropped 2 lines past step 2" in log
    assert [(m["step"], m["loss"]) for m in metrics(out)] == [(m["step"], m["loss"]) for m in metrics(baseline)]


def test_latest_needs_a_checkpoint_latest_or_new_redoes_the_attempt_and_a_new_run_refuses_an_old_folder(
    runner, baseline, data_dir, tmp_path
):
    out = tmp_path / "run"
    out.mkdir()
    # What a run killed before its first checkpoint leaves: its metric lines, the last one cut off.
    leftover = '{"step": 1, "loss": 9.0}\n{"step": 2, "lo'
    (out / "metrics.jsonl").write_text(leftover)
    code, log = runner.run(stage1_args(data_dir, out) + ["--resume_from_checkpoint", "latest"], tmp_path / "a")
    assert code != 0 and f"latest: {out} holds no complete step_N checkpoint" in log, log[-2000:]
    assert "--resume_from_checkpoint latest_or_new" in log
    code, log = runner.run(stage1_args(data_dir, out), tmp_path / "b")
    assert code != 0 and f"--output_dir {out} holds an earlier run (metrics.jsonl)" in log, log[-2000:]
    assert (out / "metrics.jsonl").read_text() == leftover and sorted(p.name for p in out.iterdir()) == [
        "metrics.jsonl"
    ]

    code, log = runner.run(stage1_args(data_dir, out) + ["--resume_from_checkpoint", "latest_or_new"], tmp_path / "c")
    assert code == 0, log[-2000:]
    assert [(m["step"], m["loss"]) for m in metrics(out)] == [(m["step"], m["loss"]) for m in metrics(baseline)]
    # A finished run's folder: a new run is refused, `latest` resumes its last step.
    code, log = runner.run(stage1_args(data_dir, out), tmp_path / "d")
    assert code != 0 and "holds an earlier run (metrics.jsonl, step_1, step_2, ...)" in log, log[-2000:]


def test_resolve_checkpoint_latest_and_latest_or_new(tmp_path):
    (tmp_path / "step_3").mkdir()  # an interrupted save: no completion marker
    message = rf"latest: {re.escape(str(tmp_path))} holds no complete step_N checkpoint.*latest_or_new"
    with pytest.raises(ValueError, match=message):
        resolve_checkpoint("latest", tmp_path)
    assert resolve_checkpoint("latest_or_new", tmp_path) == (None, 0)
    assert resolve_checkpoint(None, tmp_path) == (None, 0)


@pytest.fixture(scope="module")
def loud_data_dir(data_dir, tmp_path_factory) -> Path:
    """An audiofolder whose first item is a decodable 7-s float WAV with samples of 1e30 (its log-mel overflows
    float32), then the clean clips; captions and two labels for stage 2 and fine-tuning."""
    folder = tmp_path_factory.mktemp("loud_data")
    wave = 0.1 * np.sin(np.linspace(0, 2000, 7 * 16000)).astype(np.float32)
    wave[::500] = 1e30
    sf.write(folder / "loud.wav", wave, 16000, subtype="FLOAT")
    names = ["loud.wav"]
    for clip in sorted(data_dir.glob("*.flac")):
        shutil.copy(clip, folder / clip.name)
        names.append(clip.name)
    with open(folder / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "caption", "label"])
        writer.writerows([name, f"the sound of {Path(name).stem}", "ab"[i % 2]] for i, name in enumerate(names))
    return folder


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_encoder")
    M2D2AudioModel(M2D2AudioConfig(**TINY_AUDIO)).save_pretrained(folder)
    M2D2FeatureExtractor(norm_stats=[-7.0, 4.0]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("program", ["stage1", "stage2", "finetune"])
def test_a_too_loud_item_is_skipped_counted_and_named_by_every_program(
    program, runner, loud_data_dir, tiny_encoder_dir, tokenizer_dir, tmp_path
):
    """Before, stage 1 computed norm_stats [nan, nan] from it, logged a NaN loss at every step with 0 skipped items,
    exited 0 and exported NaN weights."""
    out = tmp_path / "run"
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    args = [
        "--train_data", loud_data_dir, "--output_dir", out, "--max_train_steps", 3, "--global_batch_size", 4,
        "--per_device_train_batch_size", 4, "--logging_steps", 1, "--dataloader_num_workers", 0,
        "--shuffle_buffer", 0, "--checkpointing_steps", 100, "--max_seconds", 1, "--crop_frames", 64,
    ]  # fmt: skip
    args += {
        "stage1": ["--config_overrides", TINY, "--norm_stats_crops", 8, "--min_seconds", 0.7],  # the statistics pass
        "stage2": ["--audio_model", tiny_encoder_dir, "--text_model", tokenizer_dir, "--freeze_text_model"],
        "finetune": ["--model_name_or_path", tiny_encoder_dir, "--labels", "a,b", "--mixup", 0, "--freq_mask", 0,
                     "--time_mask", 0],
    }[program]  # fmt: skip
    code, log = runner.run(args, tmp_path / "log", program=program)
    assert code == 0, log[-3000:]
    assert "Skipping audio item 'loud': peaks at 1e+30, too loud for float32 spectra" in log
    history = metrics(out)
    assert all(math.isfinite(m["loss"]) for m in history), history
    assert history[-1]["skipped_items"] >= 1 and history[-1]["skipped_steps"] == 0, history
    assert all(torch.isfinite(t).all() for t in load_file(out / "final" / "model.safetensors").values())
    norm_stats = M2D2FeatureExtractor.from_pretrained(out / "final").norm_stats
    assert all(math.isfinite(v) for v in norm_stats), norm_stats
    if program == "stage1":
        assert "the norm_stats pass skipped 1 item (named above)" in log


def test_a_nonfinite_loss_stops_the_run_naming_the_step_and_its_items(runner, data_dir, tmp_path):
    """A learning rate of 1e30 turns the weights of step 1 into ones whose step-2 loss is NaN: the run stops with
    an error (exit code 1) before applying that step, writes no checkpoint or export of it."""
    out = tmp_path / "diverged"
    code, log = runner.run(stage1_args(data_dir, out) + ["--base_learning_rate", 1e30], tmp_path / "log")
    assert code == 1, log[-3000:]
    found = re.search(
        r"NonFiniteStepError: optimiser step 2: the loss is nan, with the items (\[.*?\]) of its batch", log
    )
    assert found and "--skip_nonfinite_steps" in log, log[-3000:]
    items = ast.literal_eval(found[1])
    assert len(items) == 4 and set(items) <= {p.stem for p in data_dir.glob("*.flac")}, items
    assert [m["step"] for m in metrics(out)] == [1]
    assert (out / "step_1").is_dir() and not (out / "step_2").exists() and not (out / "final").exists()


class PoisonedLinear(nn.Module):
    """A linear model whose loss is NaN (and so its gradients) when asked."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, poison: bool) -> ModelOutput:
        loss = self.layer(x).square().mean()
        return ModelOutput(loss=loss * float("nan") if poison else loss)


class PoisonedStage:
    """A `loop.Stage` whose loss is NaN at optimiser step `poison_step` (counted from 0), and whose weights turn NaN
    after step `break_step`."""

    loss_names = ("loss",)
    description = "poisoned"
    allow_uncaptioned = None

    def __init__(self, accelerator, model: PoisonedLinear, poison_step: int = -1, break_step: int = -1):
        self.accelerator, self.model, self.poison_step, self.break_step = accelerator, model, poison_step, break_step

    def make_inputs(self, batch: dict, step: int, micro: int) -> dict:
        return {"x": batch["waveforms"].to(self.accelerator.device), "poison": step == self.poison_step}

    def after_step(self, step: int) -> dict:
        if step == self.break_step:
            with torch.no_grad():
                self.model.layer.bias.fill_(float("inf"))
        return {}

    def export(self, folder: Path, step: int) -> None:
        folder.mkdir(parents=True)


def poisoned_run(output_dir: Path, skip: bool, **poison) -> tuple:
    """An in-process run of the shared loop over 4 steps of 2 random clips each (ids clip0, clip1, ...), a
    checkpoint after every step."""
    settings = TrainingSettings(
        train_data="unused", output_dir=str(output_dir), max_train_steps=4, global_batch_size=2,
        per_device_train_batch_size=2, logging_steps=1, checkpointing_steps=1, skip_nonfinite_steps=skip,
    )  # fmt: skip
    accelerator = loop.build_accelerator(settings)
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"waveforms": torch.randn(2, 3, generator=generator), "ids": [f"clip{2 * i}", f"clip{2 * i + 1}"],
         "num_skipped": 0}
        for i in range(4)
    ]  # fmt: skip
    model = PoisonedLinear()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    stream = loop.BatchStream(torch.utils.data.DataLoader(batches, batch_size=None))
    run = loop.TrainingRun(model, optimizer, scheduler, stream, loop.RunState())
    loop.start_run(accelerator, run, None, "poisoned", {})
    stage = PoisonedStage(accelerator, accelerator.unwrap_model(model), **poison)
    return loop.run_training, (accelerator, settings, run, stage)


def test_a_nonfinite_step_is_skipped_and_counted_with_skip_nonfinite_steps(tmp_path):
    train, arguments = poisoned_run(tmp_path / "skipped", skip=True, poison_step=1)
    final = train(*arguments)
    history = metrics(tmp_path / "skipped")
    assert [m["skipped_steps"] for m in history] == [0, 1, 1, 1], history
    assert math.isnan(history[1]["loss"]) and all(math.isfinite(m["loss"]) for m in history[::2])
    # Step 2 left the weights as step 1 had them; training went on after it.
    assert same_weights(tmp_path / "skipped" / "step_1", tmp_path / "skipped" / "step_2")
    assert not same_weights(tmp_path / "skipped" / "step_2", tmp_path / "skipped" / "step_3")
    assert final.is_dir()
    state = json.loads((tmp_path / "skipped" / "step_4" / "trainer_state.json").read_text())
    assert state["run"]["skipped_steps"] == 1

    train, arguments = poisoned_run(tmp_path / "stopped", skip=False, poison_step=1)
    with pytest.raises(loop.NonFiniteStepError, match=r"optimiser step 2: the loss is nan, .*\['clip2', 'clip3'\]"):
        train(*arguments)
    assert not (tmp_path / "stopped" / "step_2").exists()


def test_weights_or_norm_stats_that_are_not_finite_are_never_written(tmp_path):
    train, arguments = poisoned_run(tmp_path / "broken", skip=False, break_step=3)
    with pytest.raises(ValueError, match=r"refusing to write .*step_4: 1 of 2 tensors hold NaN or Inf \(layer.bias\)"):
        train(*arguments)
    assert (tmp_path / "broken" / "step_3").is_dir()
    assert not (tmp_path / "broken" / "step_4").exists() and not (tmp_path / "broken" / "final").exists()
    with pytest.raises(ValueError, match=r"refusing to write out: its norm_stats \[nan, nan\] are not finite"):
        require_finite(nn.Linear(1, 1), [float("nan"), float("nan")], "out")
    require_finite(nn.Linear(1, 1), [-7.0, 4.0], "out")


def test_a_new_run_refuses_a_folder_with_an_earlier_runs_metrics_before_creating_anything(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    settings = TrainingSettings(train_data="x", output_dir=str(tmp_path), max_train_steps=1)
    with pytest.raises(ValueError, match="holds an earlier run.*--resume_from_checkpoint latest"):
        loop.build_accelerator(settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


# ---------------------------------------------------------------------------------------------------------------------
# The converter: whole folders, clear errors, one CLI line and exit code 2
# ---------------------------------------------------------------------------------------------------------------------


def encoder_checkpoint(tmp_path: Path, **changes) -> Path:
    torch.manual_seed(0)
    state = layout.encoder_state()
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return layout.save(state, tmp_path, "m2d_vit_base-80x208p16x16-240101")


def cli_error(capsys, argv: list) -> str:
    """Runs `m2d2-hf convert`, which must fail with exit code 2 and one line on stderr; returns the line."""
    assert cli.main(["convert", *map(str, argv)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_converter_refuses_a_non_empty_folder_and_overwrite_replaces_it_whole(tmp_path, capsys):
    checkpoint = encoder_checkpoint(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")  # a file of the model that was there before
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        convert_checkpoint(checkpoint, out)
    assert "--overwrite" in cli_error(capsys, [checkpoint, out])
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json"]
    assert cli.main(["convert", str(checkpoint), str(out), "--overwrite"]) == 0
    assert "tokenizer.json" not in {p.name for p in out.iterdir()} and (out / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (convert_checkpoint(checkpoint, empty) / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "m2d_vit_base-80x208p16x16-240101", "out"]


def test_a_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    checkpoint = encoder_checkpoint(tmp_path)
    old = tmp_path / "old"
    convert_checkpoint(checkpoint, old)
    before = {p.name: p.read_bytes() for p in old.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("m2d2_hf.conversion.M2D2FeatureExtractor.save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(checkpoint, tmp_path / "new")
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(checkpoint, old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m2d_vit_base-80x208p16x16-240101", "old"]
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_converter_missing_tensor_is_a_clear_error(tmp_path, capsys):
    for key in ("cls_token", "blocks.0.mlp.fc1.weight", "pos_embed"):
        checkpoint = encoder_checkpoint(tmp_path / key, **{key: None})
        with pytest.raises(ValueError, match=f"no tensor '{key}'.*truncated"):
            convert_checkpoint(checkpoint, tmp_path / "out")
        assert f"no tensor '{key}'" in cli_error(capsys, [checkpoint, tmp_path / "out"])
    assert not (tmp_path / "out").exists()


def test_converter_output_path_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    checkpoint = encoder_checkpoint(tmp_path)
    target = tmp_path / "model.bin"
    target.write_text("keep me")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        convert_checkpoint(checkpoint, target)
    assert "is a file, not a folder" in cli_error(capsys, [checkpoint, target])
    assert "Not a directory" in cli_error(capsys, [checkpoint, target / "sub"])  # a file above the output folder
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("stats", [[float("nan"), 4.0], [-6.5, float("inf")], [-6.5, 0.0]])
def test_converter_refuses_norm_stats_that_are_not_finite(tmp_path, capsys, stats):
    checkpoint = encoder_checkpoint(tmp_path, norm_stats=torch.tensor(stats))
    with pytest.raises(ValueError, match="norm_stats .* not a finite"):
        convert_checkpoint(checkpoint, tmp_path / "out")
    assert "norm_stats" in cli_error(capsys, [checkpoint, tmp_path / "out"])
    assert not (tmp_path / "out").exists()


def test_converter_refuses_weights_that_are_not_finite(tmp_path):
    nan_weight = encoder_checkpoint(tmp_path / "w", **{"norm.weight": torch.full((32,), float("nan"))})
    with pytest.raises(ValueError, match=r"\['layernorm.weight'\] hold NaN"):
        convert_checkpoint(nan_weight, tmp_path / "out")
    assert not (tmp_path / "out").exists()
