"""The converter on small checkpoints in each original layout: naming, total key mapping, safe loading."""

import datetime

import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModel, AutoModelForAudioClassification, AutoTokenizer

from m2d2_hf import M2D2AudioModel, M2D2ClapModel, M2D2ForAudioClassification
from m2d2_hf.conversion import Architecture, convert_checkpoint, load_original_checkpoint, parse_checkpoint_name

from . import original_layout as layout
from .test_model_card import assert_model_card


def test_parse_checkpoint_names():
    released = parse_checkpoint_name("m2d_clap_vit_base-80x1001p16x16p16kpBpTI-2025")
    assert released == Architecture(input_size=(80, 1001), patch_size=(16, 16), sampling_rate=16000, text_encoder="B")
    m2d = parse_checkpoint_name("m2d_vit_base-80x608p16x16-221006-mr7")
    assert m2d == Architecture(input_size=(80, 608), patch_size=(16, 16), sampling_rate=16000, text_encoder=None)
    assert parse_checkpoint_name("m2d_as_vit_base-80x608p16x16p32k-240213").sampling_rate == 32000
    assert parse_checkpoint_name("my_weights") is None
    assert parse_checkpoint_name("m2d_vit_base-80x608") is None


def encoder_outputs(model: M2D2AudioModel, features: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(features).last_hidden_state


def test_encoder_only_checkpoint(tmp_path):
    torch.manual_seed(0)
    state = layout.encoder_state()
    path = layout.save(state, tmp_path, "m2d_vit_base-80x208p16x16-240101_enconly", "weights.pth", wrap=False)
    out = convert_checkpoint(path, tmp_path / "out")
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, M2D2AudioModel)
    assert model.config.chunk_frames == 208
    assert AutoFeatureExtractor.from_pretrained(out).norm_stats == pytest.approx([-6.5, 4.0])
    assert torch.equal(model.embeddings.position_embeddings, state["pos_embed"])
    assert torch.equal(model.layers[1].attention.qkv.weight, state["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.layernorm.bias, state["norm.bias"])
    assert (out / "preprocessor_config.json").exists()
    card = assert_model_card(out, "M2D2AudioModel", None, ntt=True)
    assert "m2d2-hf convert m2d_vit_base-80x208p16x16-240101_enconly/weights.pth OUT_DIR\n" in card.text


def test_pretraining_flag_on_a_checkpoint_without_the_training_parts_is_refused(tmp_path):
    name = "m2d_vit_base-80x208p16x16-240101_enconly"
    path = layout.save(layout.encoder_state(), tmp_path, name, "w.pth", wrap=False)
    with pytest.raises(ValueError, match="without the EMA target and predictor"):
        convert_checkpoint(path, tmp_path / "out", pretraining=True)
    assert not (tmp_path / "out").exists()


def test_pretraining_checkpoint_drops_training_parts(tmp_path, caplog):
    torch.manual_seed(0)
    state = layout.encoder_state()
    state.update(
        {f"target_{k}": v.clone() for k, v in layout.encoder_state().items() if k.startswith(("blocks.", "norm."))}
    )
    state.update({"decoder_embed.weight": torch.randn(16, 32), "mask_token": torch.zeros(1, 1, 16)})
    path = layout.save(state, tmp_path, "m2d_vit_base-80x208p16x16-240101")
    model = AutoModel.from_pretrained(convert_checkpoint(path, tmp_path / "out"))
    assert torch.equal(model.layers[0].mlp.fc1.weight, state["blocks.0.mlp.fc1.weight"])


def test_evar_finetuned_checkpoint(tmp_path):
    torch.manual_seed(0)
    state = {f"module.ar.runtime.backbone.{k}": v for k, v in layout.encoder_state().items()}
    state["module.ar.runtime.to_spec.mel_basis"] = torch.rand(80, 201)
    state.update(
        {"module.head.norm.running_mean": torch.zeros(32), "module.head.mlp.mlp.0.weight": torch.randn(5, 32)}
    )
    state.update({"module.head.norm.running_var": torch.rand(32) + 0.5, "module.head.mlp.mlp.0.bias": torch.randn(5)})
    path = layout.save(
        state, tmp_path, "m2d_vit_base-80x208p16x16-240101_AS-FT_enconly", "weights_ep1.pth", wrap=False
    )
    classifier = AutoModelForAudioClassification.from_pretrained(convert_checkpoint(path, tmp_path / "out"))
    assert isinstance(classifier, M2D2ForAudioClassification) and classifier.config.num_labels == 5
    assert classifier.config.problem_type == "multi_label_classification"
    assert torch.equal(classifier.audio_model.embeddings.cls_token, state["module.ar.runtime.backbone.cls_token"])
    assert torch.equal(classifier.classifier.weight, state["module.head.mlp.mlp.0.weight"])
    assert torch.equal(classifier.head_norm.running_var, state["module.head.norm.running_var"])
    encoder = AutoModel.from_pretrained(convert_checkpoint(path, tmp_path / "encoder", encoder_only=True))
    assert isinstance(encoder, M2D2AudioModel)
    assert torch.equal(encoder.embeddings.cls_token, state["module.ar.runtime.backbone.cls_token"])


def test_2025_layout_with_bert_tower(tmp_path, tokenizer_dir):
    """`backbone.*` + `text_encoder.text_encoder.*` + `logit_scale` + `to_spec.*`, as the released file."""
    torch.manual_seed(0)
    bert = AutoModel.from_config(
        __import__("transformers").BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
        )
    )
    state = {f"backbone.{k}": v for k, v in {**layout.encoder_state(), **layout.semantic_projector_state()}.items()}
    state.update({f"text_encoder.text_encoder.{k}": v for k, v in bert.state_dict().items()})
    state.update({"logit_scale": torch.tensor(2.5), "to_spec.mel_basis": torch.rand(80, 201)})
    path = layout.save(state, tmp_path, "m2d_clap_vit_base-80x208p16x16p16kpBpTI-2025", "checkpoint-30.pth")
    out = convert_checkpoint(path, tmp_path / "out", tokenizer=str(tokenizer_dir))
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, M2D2ClapModel)
    assert model.config.audio_projector_type == "semantic" and model.config.text_pooling == "cls"
    assert model.config.text_config.num_hidden_layers == 2 and not model.config.text_projection
    assert torch.equal(
        model.audio_projection.layers[0].attention.qkv.weight,
        state["backbone.audio_proj.sem_blocks.0.attn.qkv.weight"],
    )
    assert torch.equal(
        model.text_model.encoder.layer[1].output.dense.weight, bert.encoder.layer[1].output.dense.weight
    )
    assert model.logit_scale.item() == 2.5
    assert AutoTokenizer.from_pretrained(out)("a dog")["input_ids"][0] == 101
    card = assert_model_card(out, "M2D2ClapModel", "zero-shot-audio-classification", ntt=True)
    assert f"--tokenizer {tokenizer_dir}" in card.text
    encoder_only = AutoModel.from_pretrained(convert_checkpoint(path, tmp_path / "enc", encoder_only=True))
    assert isinstance(encoder_only, M2D2AudioModel)
    features = torch.randn(1, 80, 300)
    torch.testing.assert_close(encoder_outputs(encoder_only, features), encoder_outputs(model.audio_model, features))


def test_2024_layout_with_a_separate_text_model(tmp_path, tokenizer_dir):
    """MLP projector over the token mean, a text tower from its own folder (mean pooling), and a text_proj Linear."""
    torch.manual_seed(0)
    state = {**layout.encoder_state(), **layout.mlp_projector_state()}
    state.update({"text_proj.weight": torch.randn(32, 384) * 0.05, "text_proj.bias": torch.zeros(32)})
    state["logit_scale"] = torch.tensor(2.0)
    state.update({"target_norm.weight": torch.ones(32), "decoder_pred.weight": torch.randn(32, 16)})
    path = layout.save(state, tmp_path, "m2d_clap_vit_base-80x208p16x16-240128")
    with pytest.raises(ValueError, match="text_model"):
        convert_checkpoint(path, tmp_path / "missing")
    model = AutoModel.from_pretrained(convert_checkpoint(path, tmp_path / "out", text_model=str(tokenizer_dir)))
    assert model.config.audio_projector_type == "mlp" and model.config.text_pooling == "mean"
    assert model.config.text_projection and torch.equal(model.text_projection.weight, state["text_proj.weight"])
    assert torch.equal(model.audio_projection.fc2.weight, state["audio_proj.2.weight"])
    reference = AutoModel.from_pretrained(tokenizer_dir)
    assert torch.equal(model.text_model.embeddings.word_embeddings.weight, reference.embeddings.word_embeddings.weight)


def test_unknown_and_missing_keys_are_named(tmp_path):
    state = layout.encoder_state()
    state["blocks.0.attn.q_norm.weight"] = torch.ones(32)
    path = layout.save(state, tmp_path, "m2d_vit_base-80x208p16x16-240101")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q_norm\.weight"):
        convert_checkpoint(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    state = layout.encoder_state()
    del state["blocks.1.mlp.fc2.bias"]
    path = layout.save(state, tmp_path, "m2d_vit_base-80x208p16x16-240102")
    with pytest.raises(ValueError, match=r"missing \['layers\.1\.mlp\.fc2\.bias'\]"):
        convert_checkpoint(path, tmp_path / "out")


def test_architecture_comes_from_the_name_or_flags(tmp_path):
    state = layout.encoder_state()
    path = layout.save(state, tmp_path, "renamed_folder")
    with pytest.raises(ValueError, match="input_size"):
        convert_checkpoint(path, tmp_path / "out")
    model = AutoModel.from_pretrained(convert_checkpoint(path, tmp_path / "out", input_size=(80, 208)))
    assert model.config.chunk_frames == 208
    wrong = layout.save(state, tmp_path, "m2d_vit_base-80x608p16x16-240101")
    with pytest.raises(ValueError, match="pos_embed has 66 rows"):
        convert_checkpoint(wrong, tmp_path / "wrong")


class NotAllowed:
    pass


def test_loading_refuses_arbitrary_pickled_objects(tmp_path):
    path = tmp_path / "m2d_vit_base-80x208p16x16-240101" / "checkpoint.pth"
    path.parent.mkdir()
    torch.save({"model": layout.encoder_state(), "args": NotAllowed(), "when": datetime.datetime.now()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_original_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_original_checkpoint(tmp_path / "nothing.pth")
    import argparse

    torch.save({"model": layout.encoder_state(), "args": argparse.Namespace(seed=7), "epoch": 3}, path)
    assert "cls_token" in load_original_checkpoint(path)
