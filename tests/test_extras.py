"""The model needs none of the optional extras: with their packages blocked, `import m2d2_hf` and `AutoModel` work,
and importing training, evaluation or plotting a timeline names the extra that installs what is missing."""

import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest

from m2d2_hf.extras import EXTRAS, PIP_NAMES, MissingExtraError, require_extra

from .test_modeling import tiny_audio_model


REPO = Path(__file__).resolve().parents[1]
# The import names of every optional extra's packages (setup.cfg's extras_require), blocked in the probe below.
BLOCKED = [
    "accelerate",
    "datasets",
    "evaluate",
    "sklearn",
    "matplotlib",
    "torchcodec",
    "tensorboard",
    "faiss",
    "bm25s",
    "fastapi",
    "uvicorn",
    "onnx",
    "onnxruntime",
    "onnxscript",
]

# Runs in a fresh interpreter: `sys.modules[name] = None` makes `import name` fail and `find_spec(name)` return None,
# as if the package were not installed.
PROBE = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None
import torch
from transformers import AutoModel
import m2d2_hf
model = AutoModel.from_pretrained({folder!r})
with torch.no_grad():
    frames = model(torch.randn(1, 80, 160)).frame_features.shape[1]
messages = {{}}
for extra, statement in [
    ("train", "import m2d2_hf.training"),
    ("eval", "import m2d2_hf.evaluation"),
    ("timeline", "from m2d2_hf.timeline import plot_timeline; plot_timeline(None, None, 16000, 'unused.png')"),
]:
    try:
        exec(statement)
    except ModuleNotFoundError as error:
        messages[extra] = str(error)
loaded = sorted(name for name in {blocked!r} if sys.modules.get(name) is not None)
print(json.dumps({{"class": type(model).__name__, "frames": frames, "messages": messages, "loaded": loaded}}))
"""


def test_the_model_loads_without_the_extras_and_features_name_theirs(tmp_path):
    tiny_audio_model().save_pretrained(tmp_path)
    probe = PROBE.format(blocked=BLOCKED, folder=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"] == "M2D2AudioModel" and report["frames"] > 0
    assert report["loaded"] == []
    assert set(report["messages"]) == {"train", "eval", "timeline"}
    for extra, message in report["messages"].items():
        assert f'pip install -e ".[{extra}]"' in message, message


def test_require_extra_names_the_pip_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    with pytest.raises(
        MissingExtraError, match=r'needs scikit-learn, which is not installed: pip install -e "\.\[eval\]" in the'
    ):
        require_extra("eval")
    with pytest.raises(ValueError, match="unknown extra 'plots'"):
        require_extra("plots")


def test_the_checked_extras_are_declared_in_setup_cfg():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    declared = {
        name: {line.split(">")[0].split("=")[0].strip() for line in value.splitlines() if line.strip()}
        for name, value in setup["options.extras_require"].items()
    }
    core = {line.split(">")[0].split("=")[0].strip() for line in setup["options"]["install_requires"].splitlines()}
    for extra, (_, packages) in EXTRAS.items():
        pip_names = {PIP_NAMES.get(name, name) for name in packages}
        assert pip_names <= declared[extra], extra
        assert pip_names <= declared["dev"], extra
        assert not pip_names & core, f"{extra}'s packages are hard dependencies"


def test_the_readme_table_of_extras_is_setup_cfgs():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    declared = {
        name: {line.split(">")[0].split("=")[0].strip() for line in value.splitlines() if line.strip()}
        for name, value in setup["options.extras_require"].items()
    }
    readme = (REPO / "README.md").read_text()
    start = readme.index("## Installation and extras")
    section = readme[start : readme.index("\n## ", start + 1)]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
    table = {row[1].strip().strip("`"): {name.strip() for name in row[3].split(",") if name.strip()} for row in rows}
    assert set(table) == set(declared), "every extra of setup.cfg has a row, and no other"
    for extra, packages in table.items():
        if extra != "dev":  # dev's row lists none: it is every extra plus the test tools
            assert packages == declared[extra], extra
    assert 'pip install -e ".[search]"' in section and "pip install m2d2_hf" not in readme
