# The two commands of the README: `make demo` (set up + main job) and `make test` (set up + test suite).
# Both create .venv, install the package with its dev extras, and install Debian's ffmpeg when it is missing and
# this user can (root or passwordless sudo); without ffmpeg, formats libsndfile cannot read (m4a, aac) are not decoded.

VENV ?= .venv
PYTHON ?= python3
SHARED ?= ../shared
OUT ?= out
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/m2d2-hf
DEMO_MODEL := examples/demo_model
# All 60 TEST clips when ../shared is beside the repository; otherwise the 51 bundled ones (FSDD clips are not
# redistributed in the repository).
DEMO_DATA := $(if $(wildcard $(SHARED)/data/real_sounds/metadata.csv),$(SHARED)/data/real_sounds,examples/data)
# Three TEST clips and a query for each, as in the README's timeline image.
TIMELINE_CLIPS := examples/data/audio/alarm/fd_phone_outgoing_calling.flac:"a telephone rings" \
  examples/data/audio/speech_digit/ast_digits_5.flac:"a woman says a number" \
  examples/data/audio/cattle/tux_animals_mammals_bovines_bull.flac:"a bull bellows"

.PHONY: setup demo demo-train train-small test test-e2e lint clean

$(VENV)/.installed: setup.cfg pyproject.toml
	@missing="$$(command -v ffmpeg >/dev/null || echo ffmpeg) $$(command -v chromium >/dev/null || echo chromium) \
	  $$(command -v chromedriver >/dev/null || echo chromium-driver)"; missing="$$(echo $$missing)"; \
	[ -z "$$missing" ] || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing >/dev/null; \
	  elif sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: cannot install $$missing here: formats libsndfile cannot read (m4a, aac) need ffmpeg; the search page's browser test skips without chromium"; fi; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

setup: $(VENV)/.installed

# The main job: the demo model shipped in examples/demo_model (trained by examples/recipes/demo on the TRAIN split)
# classifies the TEST clips zero-shot among the 22 labels, through pipeline() and through the CLI, then embeds a few
# clips and draws a text-queried timeline.
demo: setup
	HF_HUB_OFFLINE=1 $(PY) examples/zero_shot_demo.py $(DEMO_MODEL) $(DEMO_DATA) --split test
	HF_HUB_OFFLINE=1 $(CLI) zero-shot $(DEMO_MODEL) --metadata $(DEMO_DATA)/metadata.csv --split test --top-k 1
	HF_HUB_OFFLINE=1 $(CLI) embed $(DEMO_MODEL) examples/data/audio/dog_cat/*.flac --output $(OUT)/embeddings --level all
	HF_HUB_OFFLINE=1 $(PY) examples/timeline_demo.py $(DEMO_MODEL) $(OUT)/timeline $(TIMELINE_CLIPS)

# A small offline training run to copy: the demo recipe's shortened schedule (a few minutes on 2 CPU cores; needs
# ../shared) into $(OUT)/train_small.
train-small: setup
	HF_HUB_OFFLINE=1 $(PY) examples/recipes/demo/train_demo.py --data $(SHARED)/data/real_sounds --work_dir $(OUT)/train_small --quick

# Retrains the demo model with its recipe (about 15 minutes on 2 CPU cores; needs ../shared) into $(OUT)/demo_recipe.
demo-train: setup
	HF_HUB_OFFLINE=1 $(PY) examples/recipes/demo/train_demo.py --data $(SHARED)/data/real_sounds --work_dir $(OUT)/demo_recipe

# The suite runs after the lint, so CI keeps the tree ruff-clean. The parity tests on the full-size fixture
# checkpoints (`slow`) run in processes of their own, the pre-training replay (a full-size model with its gradients
# and AdamW moments) alone, so that each process stays within 4 GB. The end-to-end retraining of the demo recipe
# (`e2e`, minutes of training) runs in `make test-e2e`; CI (.ci/run) runs both.
PYTEST := HF_HUB_OFFLINE=1 M2D2_SHARED_DIR=$(SHARED) $(PY) -m pytest -q
test: lint
	$(PYTEST) --durations=10 -m "not slow and not e2e"
	$(PYTEST) --durations=5 -m slow --ignore=tests/test_pretraining_parity.py
	$(PYTEST) tests/test_pretraining_parity.py

test-e2e: setup
	$(PYTEST) --durations=10 -m e2e

# Lint and format check with the rules and the 119-column limit of pyproject.toml's [tool.ruff].
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(OUT)
