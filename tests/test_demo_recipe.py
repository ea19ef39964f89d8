"""Retraining the demo model with its recipe (shortened schedule) still learns: a regression in the training code
(stage 1, stage 2, the data path, the text tower) shows up as lost zero-shot accuracy."""

import json
import runpy
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPE = REPO_ROOT / "examples" / "recipes" / "demo" / "train_demo.py"
SHIPPED = json.loads((REPO_ROOT / "examples" / "demo_model" / "demo_report.json").read_text())
# The quick schedule (200 + 150 steps, 3 minutes on 2 cores) measured top-1 0.217 and mean per-class 0.109 here
# against the shipped model's 0.267 and 0.167; the test asks for FRACTION of the shipped figures (README: "Demo
# model"). Per-class accuracy is checked too because top-1 alone passes a model that answers "speech digit" to
# everything (0.250), while that scores 1/22 = 0.045 per class.
FRACTION = 0.5
# Minutes of training: outside `make test`'s loop, run by `make test-e2e` (CI runs both).
pytestmark = pytest.mark.e2e


def test_quick_recipe_reaches_a_fraction_of_the_shipped_accuracy(real_sounds_dir, tmp_path):
    recipe = runpy.run_path(str(RECIPE))
    report = recipe["main"](["--data", str(real_sounds_dir), "--work_dir", str(tmp_path), "--quick"])
    assert report["schedule"] == "quick" and report["test_clips"] == 60
    assert report["top1_accuracy"] >= FRACTION * SHIPPED["top1_accuracy"], report
    assert report["mean_per_class_accuracy"] >= FRACTION * SHIPPED["mean_per_class_accuracy"], report
    assert (tmp_path / "model" / "model.safetensors").is_file()
