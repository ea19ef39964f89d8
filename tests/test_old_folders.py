"""Folders written by earlier versions load with identical outputs, and re-saving them writes the current layout:
the encoder config holds the encoder only, the feature extractor the front end, `M2D2PreTrainingConfig` the
pre-training fields. The fixtures were written by the code at 350289d (tests/fixtures/make_old_folders.py; ef028ae
writes byte-identical files)."""

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel, AutoModelForPreTraining
from transformers.utils import logging as transformers_logging

from m2d2_hf import (
    M2D2AudioConfig,
    M2D2AudioModel,
    M2D2ClapModel,
    M2D2FeatureExtractor,
    M2D2ForPreTraining,
    M2D2PreTrainingConfig,
)
from m2d2_hf.configuration_m2d2 import FRONT_END_FIELDS, PRETRAINING_FIELDS
from m2d2_hf.modeling_m2d2 import sincos_position_table


REPO_ROOT = Path(__file__).resolve().parents[1]
OLD = REPO_ROOT / "tests" / "fixtures" / "old_folders" / "350289d"
DEMO_MODEL = REPO_ROOT / "examples" / "demo_model"
OLD_NORM_STATS = [-6.0, 3.5]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return load_file(OLD / "outputs.safetensors")


@pytest.fixture
def warnings_logged():
    """The warnings transformers logs (its library logger does not propagate to pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    library = transformers_logging.get_logger("transformers")
    library.addHandler(handler)
    yield records
    library.removeHandler(handler)


def audio_outputs(model: M2D2AudioModel, reference: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        result = model.eval()(reference["input_features"])
    return {"audio.last_hidden_state": result.last_hidden_state, "audio.pooler_output": result.pooler_output}


def clap_outputs(model: M2D2ClapModel, reference: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        result = model.eval()(input_features=reference["input_features"], input_ids=reference["input_ids"])
    return {name: getattr(result, name.split(".")[1]) for name in reference if name.startswith("clap.")}


def pretraining_outputs(model: M2D2ForPreTraining, reference: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        result = model.eval()(
            reference["input_features"][..., :64],
            caption_embeddings=reference["caption_embeddings"],
            generator=torch.Generator().manual_seed(1),
        )
    return {name: getattr(result, name.split(".")[1]) for name in reference if name.startswith("pretraining.")}


def assert_same(got: dict[str, torch.Tensor], reference: dict) -> None:
    """Equal to 1e-6 of each output's own scale: the fixtures were written on one CPU, and another's kernels round
    differently (the CLAP logits, 100 x cosines up to 37, differ there by 1.5e-5 = 4 ulp on an AMD EPYC)."""
    assert got
    for name, value in got.items():
        scale = max(1.0, reference[name].abs().max().item())
        torch.testing.assert_close(value, reference[name], atol=1e-6 * scale, rtol=0, msg=name)


def slim(audio_config: dict) -> bool:
    return not set(audio_config) & {*FRONT_END_FIELDS, *PRETRAINING_FIELDS}


def test_old_encoder_folder_loads_identically_and_resaves_slim(reference, tmp_path, warnings_logged):
    model = AutoModel.from_pretrained(OLD / "audio")
    assert type(model) is M2D2AudioModel and type(model.config) is M2D2AudioConfig
    assert not warnings_logged, [r.getMessage() for r in warnings_logged]
    assert_same(audio_outputs(model, reference), reference)
    # Saved without a preprocessor_config.json: its front end comes from the fields its config carried.
    front_end = M2D2FeatureExtractor.from_model_folder(OLD / "audio", model.config)
    assert front_end.norm_stats == OLD_NORM_STATS and front_end.feature_size == 32 and front_end.min_frames == 16
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert slim(saved) and saved["model_type"] == "m2d2_audio"
    assert_same(audio_outputs(M2D2AudioModel.from_pretrained(tmp_path), reference), reference)


def test_old_clap_folder_loads_identically_and_resaves_slim(reference, tmp_path, warnings_logged):
    model = AutoModel.from_pretrained(OLD / "clap")
    assert type(model) is M2D2ClapModel
    assert AutoFeatureExtractor.from_pretrained(OLD / "clap").norm_stats == OLD_NORM_STATS
    assert not warnings_logged, [r.getMessage() for r in warnings_logged]
    assert_same(clap_outputs(model, reference), reference)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert slim(saved["audio_config"]) and saved["audio_projector_type"] == "semantic"
    assert_same(clap_outputs(M2D2ClapModel.from_pretrained(tmp_path), reference), reference)


def test_old_pretraining_folder_loads_identically_and_resaves_as_pretraining(reference, tmp_path, warnings_logged):
    assert type(AutoConfig.from_pretrained(OLD / "pretraining")) is M2D2PreTrainingConfig
    for model in (
        AutoModelForPreTraining.from_pretrained(OLD / "pretraining"),
        M2D2ForPreTraining.from_pretrained(OLD / "pretraining"),
    ):
        assert type(model.config) is M2D2PreTrainingConfig and model.config.caption_embedding_size == 12
        assert_same(pretraining_outputs(model, reference), reference)
    assert not warnings_logged, [r.getMessage() for r in warnings_logged]
    model.save_pretrained(tmp_path / "pretraining")
    saved = json.loads((tmp_path / "pretraining" / "config.json").read_text())
    assert saved["model_type"] == "m2d2_pretraining" and not set(saved) & set(FRONT_END_FIELDS)
    assert saved["predictor_hidden_size"] == 8 and saved["caption_embedding_size"] == 12
    assert_same(
        pretraining_outputs(AutoModelForPreTraining.from_pretrained(tmp_path / "pretraining"), reference), reference
    )
    # Its online encoder exports as an encoder folder; the encoder class reads a pre-training folder's encoder.
    model.audio_model.save_pretrained(tmp_path / "encoder")
    encoder = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert encoder["model_type"] == "m2d2_audio" and slim(encoder)
    assert type(M2D2AudioModel.from_pretrained(tmp_path / "pretraining").config) is M2D2AudioConfig


def test_pretraining_config_holds_the_pretraining_fields(tmp_path):
    config = M2D2PreTrainingConfig.from_pretrained(OLD / "pretraining")
    config.mask_ratio = 0.5
    model = AutoModelForPreTraining.from_config(config)
    assert type(model) is M2D2ForPreTraining and model.config is config
    model.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is M2D2PreTrainingConfig and loaded.mask_ratio == 0.5
    # An encoder config given to the pre-training model becomes the pre-training config of that encoder.
    encoder = config.encoder_config()
    assert type(encoder) is M2D2AudioConfig and not hasattr(encoder, "mask_ratio")
    assert type(M2D2ForPreTraining(encoder).config) is M2D2PreTrainingConfig
    with pytest.raises(ValueError, match="audio_projector_type"):
        M2D2PreTrainingConfig(audio_projector_type="linear")


def test_resize_position_embeddings_recomputes_or_resizes_the_grid():
    model = M2D2AudioModel(M2D2AudioConfig.from_pretrained(OLD / "audio")).eval()  # 2 x 4 patches of 16 x 16
    stored = model.get_position_embeddings().clone()
    model.resize_position_embeddings(64, "bicubic")  # the same grid: the identity
    torch.testing.assert_close(model.get_position_embeddings(), stored, atol=1e-6, rtol=0)
    model.resize_position_embeddings(160, "bicubic")
    resized = model.get_position_embeddings()
    assert model.config.chunk_frames == 160 and resized.shape == (1, 1 + 2 * 10, 16)
    assert torch.equal(resized[0, 0], stored[0, 0])
    assert not torch.allclose(resized, sincos_position_table(16, 2, 10)[None], atol=1e-3)
    model.resize_position_embeddings(160)
    assert torch.equal(model.get_position_embeddings(), sincos_position_table(16, 2, 10)[None])
    with torch.no_grad():  # a 160-frame input is now one chunk
        assert model(torch.randn(1, 32, 160)).last_hidden_state.shape == (1, 20, 16)
    with pytest.raises(ValueError, match="method"):
        model.resize_position_embeddings(160, "nearest")
    with pytest.raises(ValueError, match="shorter than one patch"):
        model.resize_position_embeddings(8)


def test_demo_config_is_slim_and_says_how_it_is_stored():
    config = json.loads((DEMO_MODEL / "config.json").read_text())
    assert slim(config["audio_config"]) and config["audio_projector_type"] == "mlp"
    with safe_open(DEMO_MODEL / "model.safetensors", "pt") as weights:
        stored = {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}
    assert stored == {"F16"} and config["dtype"] == "float16"
    # Stored so for size: it computes in float32 unless a torch dtype is asked for ("auto" is the pipelines' default).
    assert AutoModel.from_pretrained(DEMO_MODEL, dtype="auto").dtype == torch.float32
    assert "norm_stats" in json.loads((DEMO_MODEL / "processor_config.json").read_text())["feature_extractor"]
    # The modules trust_remote_code loading reads are links to the package's own, so they cannot go stale.
    modules = sorted(path.name for path in DEMO_MODEL.glob("*.py"))
    assert "modeling_m2d2.py" in modules and "feature_extraction_m2d2.py" in modules
    for name in modules:
        assert (DEMO_MODEL / name).resolve() == (REPO_ROOT / "m2d2_hf" / name).resolve(), name
