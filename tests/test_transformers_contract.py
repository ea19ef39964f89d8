"""What transformers' common tests found, checked as a user meets it: loading a classifier from an encoder folder,
attention weights, the processor's keywords, the CLAP model's main input, integer masks, configs unchanged by
saving."""

import logging
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig

from m2d2_hf import (
    M2D2AudioConfig,
    M2D2AudioModel,
    M2D2ClapModel,
    M2D2Config,
    M2D2FeatureExtractor,
    M2D2ForAudioClassification,
    M2D2Processor,
)
from m2d2_hf.modeling_m2d2 import sincos_position_table

from .conftest import minilm_dir


AUDIO = dict(
    num_mel_bins=8,
    patch_size=[4, 4],
    chunk_frames=16,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
)


def clap_config() -> M2D2Config:
    text = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37)
    return M2D2Config(
        audio_config=AUDIO, text_config=text.to_dict(), projection_dim=32, projector_intermediate_size=24
    )


def test_classifier_from_an_encoder_folder_has_initialised_head_statistics(tmp_path):
    M2D2AudioModel(M2D2AudioConfig(**AUDIO)).save_pretrained(tmp_path)
    classifier = M2D2ForAudioClassification.from_pretrained(tmp_path, num_labels=3).eval()
    torch.testing.assert_close(classifier.head_norm.running_mean, torch.zeros(32))
    torch.testing.assert_close(classifier.head_norm.running_var, torch.ones(32))
    with torch.no_grad():
        logits = classifier(torch.randn(2, 8, 40)).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_position_table_is_the_formula_before_any_initialisation():
    with torch.device("meta"):
        M2D2AudioModel(M2D2AudioConfig(**AUDIO))  # construction alone must not need _init_weights for the table
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = M2D2AudioModel(M2D2AudioConfig(**AUDIO))
    torch.testing.assert_close(model.embeddings.position_embeddings, sincos_position_table(32, 2, 4)[None])


def test_output_attentions_eager_and_sdpa():
    features = torch.randn(2, 8, 40)  # 3 chunks per clip (16 + 16 + 8 frames)
    model = M2D2AudioModel(M2D2AudioConfig(**AUDIO)).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(features, output_attentions=True)
        plain = model(features)
    assert len(out.attentions) == 2
    assert out.attentions[0].shape == (6, 4, 9, 9)  # 6 chunks, CLS + 2 x 4 tokens
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(6, 4, 9))
    assert plain.attentions is None
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state)

    classifier = M2D2ForAudioClassification(M2D2AudioConfig(**AUDIO, num_labels=2))
    classifier.set_attn_implementation("eager")
    with torch.no_grad():
        assert len(classifier.eval()(features, output_attentions=True).attentions) == 2

    clap = M2D2ClapModel(clap_config()).eval()
    clap.set_attn_implementation("eager")
    with torch.no_grad():
        audio = clap.get_audio_features(features, output_attentions=True)
    assert len(audio.attentions) == 2 and audio.attentions[0].shape == (6, 4, 9, 9)

    # As transformers' models: SDPA computes no weights (it warns), eager is the way to get them.
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert not model(features, output_attentions=True).attentions  # an empty tuple, as transformers gives


def test_outputs_masks_are_integers_and_compare():
    model = M2D2AudioModel(M2D2AudioConfig(**AUDIO)).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 8, 40), torch.tensor([[1] * 40, [1] * 20 + [0] * 20]))
    assert out.token_mask.dtype == torch.long and out.frame_mask.dtype == torch.long
    assert out.frame_mask.sum(-1).tolist() == [10, 5]
    assert (out.token_mask - out.token_mask).abs().sum() == 0  # generic equivalence code subtracts outputs


def test_clap_main_input_and_config_unchanged_by_saving(tmp_path):
    model = M2D2ClapModel(clap_config())
    assert M2D2ClapModel.main_input_name == "input_ids"
    assert M2D2AudioModel.main_input_name == "input_features"
    before = model.config.to_dict()
    model.save_pretrained(tmp_path)
    after = model.config.to_dict()
    assert "auto_map" not in after and "auto_map" in (tmp_path / "config.json").read_text()
    assert {k: v for k, v in after.items() if k not in ("architectures", "dtype")} == {
        k: v for k, v in before.items() if k not in ("architectures", "dtype")
    }


@pytest.fixture(scope="module")
def processor() -> M2D2Processor:
    return M2D2Processor(M2D2FeatureExtractor(), AutoTokenizer.from_pretrained(str(minilm_dir())))


def test_processor_follows_v5_keywords(processor):
    default = processor(text=["a dog", "a cat barking"])
    assert isinstance(default["input_ids"], torch.Tensor) and default["input_ids"].shape[0] == 2
    fixed = processor(text=["a dog"], text_kwargs={"padding": "max_length", "max_length": 12}, return_tensors="np")
    assert isinstance(fixed["input_ids"], np.ndarray) and fixed["input_ids"].shape == (1, 12)
    assert processor(text=["a dog"], padding="max_length", max_length=9)["input_ids"].shape == (1, 9)

    stereo = np.random.default_rng(0).standard_normal((2, 16000)).astype(np.float32)
    through_processor = processor(audio=stereo, mono=True, sampling_rate=16000)["input_features"]
    direct = processor.feature_extractor(stereo, mono=True, sampling_rate=16000, return_tensors="pt")["input_features"]
    assert through_processor.shape[0] == 1
    torch.testing.assert_close(through_processor, direct)
    as_audio_kwargs = processor(audio=stereo, audio_kwargs={"mono": True, "sampling_rate": 16000})
    torch.testing.assert_close(as_audio_kwargs["input_features"], direct)


def test_processor_is_quiet_on_ordinary_text(caplog):
    """A folder's tokenizer saved with `max_length` (as the demo model's is) warns on no ordinary query: the
    processor passes that setting on only with a truncation."""
    saved = AutoTokenizer.from_pretrained(str(minilm_dir()), max_length=128)
    quiet = M2D2Processor(M2D2FeatureExtractor(), saved)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        ids = quiet(text=["a dog", "a cat barking loudly"])["input_ids"]
    assert ids.shape[0] == 2 and caplog.text == ""
    assert quiet(text=["a dog"], padding="max_length", max_length=9)["input_ids"].shape == (1, 9)


def test_processor_truncates_overlong_text_with_a_warning(processor, caplog):
    limit = processor.tokenizer.model_max_length
    with caplog.at_level(logging.WARNING):
        ids = processor(text=["a dog", "word " * (limit + 50)])["input_ids"]
    assert ids.shape == (2, limit)
    assert "truncated" in caplog.text
    assert processor(text="word " * (limit + 50), truncation=True, max_length=20)["input_ids"].shape == (1, 20)


def test_feature_extractor_and_processor_unchanged_by_saving(processor, tmp_path):
    # As the configs: saving writes the `auto_map` (trust_remote_code loading) to disk only, and a saved folder
    # loads back to the objects that were saved.
    extractor = processor.feature_extractor
    before, before_extractor = processor.to_dict(), extractor.to_dict()
    processor.save_pretrained(tmp_path / "processor")
    extractor.save_pretrained(tmp_path / "extractor")
    assert processor.to_dict() == before and extractor.to_dict() == before_extractor
    assert "auto_map" in (tmp_path / "processor" / "processor_config.json").read_text()
    assert "auto_map" in (tmp_path / "extractor" / "preprocessor_config.json").read_text()
    assert M2D2Processor.from_pretrained(tmp_path / "processor").to_dict() == before
    assert M2D2FeatureExtractor.from_pretrained(tmp_path / "extractor").to_dict() == before_extractor

    # The folder's own code still loads without the package, through that auto_map.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["m2d2_hf"] = None  # only the folder's own code may be used
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(tmp_path / "processor")!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        assert "auto_map" in processor.feature_extractor.to_dict()
        print(tuple(processor(text="a dog", audio=[0.1] * 4000, sampling_rate=16000)["input_features"].shape))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("(1, 80, 26)")
