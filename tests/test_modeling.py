"""Audio encoder and CLAP model on small random configs: chunking semantics, batch invariance, attention backends,
serialisation, Auto classes, remote code, gradient checkpointing."""

import importlib.util
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoFeatureExtractor, AutoModel
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2ClapModel, M2D2Config
from m2d2_hf.chunking import ChunkLayout
from m2d2_hf.modeling_m2d2 import (
    contrastive_loss,
    frame_timestamps,
    lead_token_attention_mask,
    sincos_position_table,
)

from .conftest import FIXTURE_DIR, TINY_AUDIO, TINY_TEXT
from .test_demo_model import DEMO_MODEL


def tiny_audio_model(**overrides) -> M2D2AudioModel:
    torch.manual_seed(0)
    model = M2D2AudioModel(M2D2AudioConfig(**{**TINY_AUDIO, **overrides})).eval()
    # Random (not sin-cos) positions make a wrong column or row of the table show in the outputs.
    with torch.no_grad():
        model.embeddings.position_embeddings.normal_()
    return model


def tiny_clap_model(**overrides) -> M2D2ClapModel:
    torch.manual_seed(0)
    config = M2D2Config(
        audio_config=TINY_AUDIO,
        text_config={**TINY_TEXT, "vocab_size": 100},
        projection_dim=32,
        projector_intermediate_size=32,
        **overrides,
    )
    return M2D2ClapModel(config).eval()


def encode_like_original(model: M2D2AudioModel, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Straightforward re-statement of the original runtime for ONE clip [F, T]: zero-pad in normalised space by
    (16 - T % unit % 16) % 16, cut ceil(T / unit) chunks, encode each alone, concatenate. Returns (tokens, frames)."""
    config = model.config
    unit, frames = config.chunk_frames, features.shape[-1]
    pad = (16 - frames % unit % 16) % 16
    padded = F.pad(features, (0, pad))
    tokens, frame_features = [], []
    for i in range(math.ceil(frames / unit)):
        chunk = padded[:, i * unit : (i + 1) * unit]
        out = model(chunk[None])
        columns = chunk.shape[-1] // 16
        chunk_tokens = out.last_hidden_state[0]
        assert chunk_tokens.shape[0] == config.frequency_patches * columns
        tokens.append(chunk_tokens)
        by_column = chunk_tokens.reshape(config.frequency_patches, columns, -1).transpose(0, 1)
        frame_features.append(by_column.reshape(columns, -1))
    return torch.cat(tokens), torch.cat(frame_features)


def test_config_round_trip_and_validation(tmp_path):
    config = M2D2Config(audio_config=TINY_AUDIO, text_config=TINY_TEXT, projection_dim=32)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, M2D2Config)
    assert loaded.audio_config.to_dict() == config.audio_config.to_dict()
    assert loaded.text_config.hidden_size == 32
    assert M2D2AudioConfig.from_pretrained(tmp_path).chunk_frames == TINY_AUDIO["chunk_frames"]
    with pytest.raises(ValueError, match="norm_stats"):
        M2D2AudioConfig(norm_stats=[0.0, 0.0])
    with pytest.raises(ValueError, match="multiple of the patch height"):
        M2D2AudioConfig(num_mel_bins=72)
    with pytest.raises(ValueError, match="text_projection=True"):
        M2D2Config(audio_config=TINY_AUDIO, text_config={**TINY_TEXT, "hidden_size": 48}, projection_dim=32)
    with pytest.raises(ValueError, match="audio_projector_type"):
        M2D2Config(audio_projector_type="linear")


def test_sincos_table_matches_the_fixture_generator():
    spec = importlib.util.spec_from_file_location("make_checkpoint", FIXTURE_DIR / "make_checkpoint.py")
    if spec is None or not (FIXTURE_DIR / "make_checkpoint.py").exists():
        pytest.skip(f"{FIXTURE_DIR} is missing")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected = generator.sincos_pos_embed("fresh")[0]
    table = sincos_position_table(768, 5, 62).numpy()
    assert table.shape == expected.shape == (311, 768)
    np.testing.assert_allclose(table, expected, atol=1e-7)
    model = M2D2AudioModel(M2D2AudioConfig(**{**TINY_AUDIO, "hidden_size": 768, "num_attention_heads": 12}))
    torch.testing.assert_close(model.embeddings.position_embeddings[0], sincos_position_table(768, 5, 13))
    assert "embeddings.position_embeddings" not in dict(model.named_parameters())


@pytest.mark.parametrize(
    "frames, expected_columns",
    [(101, [7]), (1001, [62]), (1231, [62, 15]), (2001, [62, 62]), (2002, [62, 62]), (2003, [62, 62, 1])],
)
def test_chunk_layout_follows_the_original(frames, expected_columns):
    layout = ChunkLayout.from_lengths([frames], chunk_frames=1001, patch_width=16, frequency_patches=5)
    assert layout.columns.tolist() == expected_columns
    assert int(layout.frame_mask.sum()) == sum(expected_columns)
    assert int(layout.token_mask.sum()) == 5 * sum(expected_columns)


def test_chunk_layout_rejects_empty_clips():
    with pytest.raises(ValueError, match="clip 1 has no frames"):
        ChunkLayout.from_lengths([10, 0], chunk_frames=1001, patch_width=16, frequency_patches=5)


@pytest.mark.parametrize("frames", [40, 208, 300, 416, 417, 650])
def test_long_inputs_match_the_original_chunking(frames):
    model = tiny_audio_model()
    features = torch.randn(80, frames)
    with torch.no_grad():
        out = model(features[None])
        tokens, frame_features = encode_like_original(model, features)
    torch.testing.assert_close(out.last_hidden_state[0], tokens, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.frame_features[0], frame_features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.pooler_output[0], frame_features.mean(0), rtol=1e-5, atol=1e-5)


def test_batch_of_different_lengths_equals_single_clips():
    model = tiny_audio_model()
    lengths = [650, 101, 417, 30]
    features = torch.randn(len(lengths), 80, max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
        features[i, :, length:] = 123.0  # garbage past the end must not leak into the clip
    with torch.no_grad():
        batch = model(features, mask)
        for i, length in enumerate(lengths):
            single = model(features[i : i + 1, :, :length])
            n_tokens, n_frames = single.last_hidden_state.shape[1], single.frame_features.shape[1]
            assert int(batch.token_mask[i].sum()) == n_tokens and int(batch.frame_mask[i].sum()) == n_frames
            torch.testing.assert_close(
                batch.last_hidden_state[i, :n_tokens], single.last_hidden_state[0], rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(
                batch.frame_features[i, :n_frames], single.frame_features[0], rtol=1e-5, atol=1e-5
            )
            torch.testing.assert_close(batch.pooler_output[i], single.pooler_output[0], rtol=1e-5, atol=1e-5)
            assert batch.last_hidden_state[i, n_tokens:].abs().sum() == 0


@pytest.mark.parametrize("masked", [False, True])
def test_long_inputs_are_encoded_a_few_chunks_at_a_time_without_gradients(masked):
    """Without autograd the encoder runs `inference_chunks_per_pass` chunks per pass (bounded activation memory)
    with the outputs of one pass; with autograd, hidden states or attention weights it keeps the single pass."""
    model = tiny_audio_model()
    lengths = [1000, 650, 417] if masked else [1000, 1000]
    features = torch.randn(len(lengths), 80, max(lengths))
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    batch_sizes = []
    model.layers[0].register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))

    def run(per_pass, **kwargs):
        model.inference_chunks_per_pass = per_pass
        batch_sizes.clear()
        out = model(features, mask if masked else None, **kwargs)
        return out, list(batch_sizes)

    with torch.no_grad():
        whole, whole_passes = run(None)
        sliced, sliced_passes = run(2)
        _, attention_passes = run(2, output_attentions=True)
        _, hidden_state_passes = run(2, output_hidden_states=True)
    _, grad_passes = run(2)
    assert max(sliced_passes) == 2 and sum(sliced_passes) == sum(whole_passes) and max(whole_passes) > 2
    assert len(attention_passes) == len(hidden_state_passes) == 1  # the packed path: all chunks in one pass
    assert grad_passes == whole_passes
    for name in ("last_hidden_state", "frame_features", "pooler_output"):
        torch.testing.assert_close(getattr(sliced, name), getattr(whole, name), rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("masked", [False, True])
def test_lead_token_forward_is_the_blocks_first_position(attention, masked):
    """The semantic projector's last block computes only the learned token: what the full block gives there."""
    model = tiny_clap_model()
    model.set_attn_implementation(attention)
    layer = model.audio_projection.layers[0]
    hidden_states = torch.randn(3, 21, 32)
    attention_mask = None
    if masked:
        token_mask = torch.arange(20)[None] < torch.tensor([20, 13, 4])[:, None]
        attention_mask = lead_token_attention_mask(model.config, hidden_states, token_mask)
    with torch.no_grad():
        lead = layer.lead_token_forward(hidden_states, attention_mask)
        full = layer(hidden_states, attention_mask)
    assert lead.shape == (3, 1, 32)
    torch.testing.assert_close(lead, full[:, :1], rtol=1e-6, atol=1e-6)


def test_eager_and_sdpa_agree():
    model = tiny_audio_model()
    features = torch.randn(2, 80, 500)
    mask = torch.ones(2, 500, dtype=torch.long)
    mask[1, 230:] = 0
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        sdpa = model(features, mask)
        model.set_attn_implementation("eager")
        eager = model(features, mask)
    torch.testing.assert_close(sdpa.last_hidden_state, eager.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_eager_and_sdpa_gradients_agree():
    """The eager attention scales and masks its scores in place: autograd must still see the same function."""
    sdpa, eager = tiny_audio_model().train(), tiny_audio_model().train()
    eager.set_attn_implementation("eager")
    features = torch.randn(2, 80, 500)
    mask = torch.ones(2, 500, dtype=torch.bool)
    mask[1, 300:] = False
    for model in (sdpa, eager):
        model(features, mask).pooler_output.square().sum().backward()
    for (name, a), (_, b) in zip(sdpa.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_hidden_states_and_tuple_output():
    model = tiny_audio_model()
    features = torch.randn(1, 80, 300)
    with torch.no_grad():
        out = model(features, output_hidden_states=True)
        as_tuple = model(features, return_dict=False)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.hidden_states[-1].shape == out.last_hidden_state.shape
    torch.testing.assert_close(model.layernorm(out.hidden_states[-1]), out.last_hidden_state)
    assert not torch.allclose(out.hidden_states[0], out.hidden_states[1])
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)


def test_timestamps_follow_the_original():
    ts = frame_timestamps(160000, 62)
    assert ts.dtype == np.float32 and ts.shape == (62,)
    assert ts[1] == np.float32(10000 / 62)
    assert ts[61] == np.float32(61 * (10.0 / 62 * 1000.0))
    model = tiny_audio_model()
    with torch.no_grad():
        out = model(torch.randn(2, 80, 300))
    stamps = model.timestamp_embeddings(out)
    assert stamps.shape == (2, out.frame_features.shape[1], 32)
    torch.testing.assert_close(stamps[0, 3], out.frame_features[0, 3].reshape(5, 32).mean(0))


def test_bad_inputs_raise_clear_errors():
    model = tiny_audio_model()
    with pytest.raises(ValueError, match="80 mel bins"):
        model(torch.randn(1, 64, 100))
    with pytest.raises(ValueError, match="input_features_mask"):
        model(torch.randn(2, 80, 100), torch.ones(2, 99))
    with pytest.raises(ValueError, match="clip 0 has no frames"):
        model(torch.randn(1, 80, 100), torch.zeros(1, 100))


def test_save_and_load_round_trip_is_bit_identical(tmp_path):
    model = tiny_audio_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, M2D2AudioModel)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert "embeddings.position_embeddings" not in dict(loaded.named_parameters())
    features = torch.randn(1, 80, 300)
    with torch.no_grad():
        assert torch.equal(model(features).last_hidden_state, loaded(features).last_hidden_state)


def test_bfloat16_loading(tmp_path):
    tiny_audio_model().save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert model.embeddings.cls_token.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(torch.randn(1, 80, 150))
    assert out.frame_features.dtype == torch.bfloat16


def test_audio_model_loads_from_a_clap_folder(tmp_path):
    clap = tiny_clap_model()
    clap.save_pretrained(tmp_path)
    report = logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(report) as quiet:
        audio = M2D2AudioModel.from_pretrained(tmp_path)
    assert isinstance(audio.config, M2D2AudioConfig)
    for name, tensor in audio.state_dict().items():
        assert torch.equal(tensor, clap.audio_model.state_dict()[name]), name
    # The text tower and projectors of the folder are left out by design: no report of "unexpected" keys.
    assert "UNEXPECTED" not in quiet.out
    # A CLAP model still reports keys its folder has and it lacks.
    weights = tmp_path / "model.safetensors"
    save_file({**load_file(weights), "text_model.extra.weight": torch.zeros(2)}, weights, metadata={"format": "pt"})
    with CaptureLogger(report) as loud:
        M2D2ClapModel.from_pretrained(tmp_path)
    assert "text_model.extra.weight" in loud.out and "UNEXPECTED" in loud.out


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing: bool) -> dict:
        model = tiny_audio_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        torch.manual_seed(1)
        model(torch.randn(2, 80, 250)).pooler_output.square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert "embeddings.position_embeddings" not in plain
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-5, atol=1e-6)


def test_clap_forward_logits_and_loss():
    model = tiny_clap_model()
    ids = torch.randint(1, 100, (3, 6))
    text_mask = torch.ones(3, 6, dtype=torch.long)
    text_mask[2, 4:] = 0
    features, feature_mask = torch.randn(3, 80, 300), torch.ones(3, 300, dtype=torch.long)
    feature_mask[1, 120:] = 0
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=text_mask,
            input_features=features,
            input_features_mask=feature_mask,
            token_type_ids=torch.zeros_like(ids),
            return_loss=True,
        )
        audio = model.get_audio_features(features, feature_mask).pooler_output
        text = model.get_text_features(ids, text_mask).pooler_output
    torch.testing.assert_close(audio.norm(dim=-1), torch.ones(3))
    logits = audio @ text.t() * 100.0
    torch.testing.assert_close(out.logits_per_audio, logits, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.logits_per_text, logits.t(), rtol=1e-5, atol=1e-4)
    labels = torch.arange(3)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        contrastive_loss(torch.eye(2) * 10), F.cross_entropy(torch.eye(2) * 10, torch.arange(2))
    )
    with pytest.raises(ValueError, match="input_ids"):
        model(input_features=features)
    with pytest.raises(ValueError, match="one text per clip"):
        model(input_ids=ids[:2], input_features=features, return_loss=True)


def test_semantic_projector_ignores_token_order_and_padding():
    model = tiny_clap_model()
    tokens = torch.randn(1, 20, 32)
    with torch.no_grad():
        reference = model.audio_projection(tokens)
        shuffled = model.audio_projection(tokens[:, torch.randperm(20)])
        padded = torch.cat([tokens, torch.randn(1, 5, 32)], dim=1)
        masked = model.audio_projection(padded, torch.arange(25)[None] < 20)
    torch.testing.assert_close(shuffled, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, reference, rtol=1e-5, atol=1e-5)
    assert model.audio_projection.layers[0].norm1.eps == 1e-5
    assert model.audio_projection.layers[0].attention.num_attention_heads == 1


def test_mlp_projector_mean_pooling_and_text_projection():
    model = tiny_clap_model(audio_projector_type="mlp", text_pooling="mean", text_projection=True)
    tokens, mask = torch.randn(2, 10, 32), torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    projector = model.audio_projection
    with torch.no_grad():
        out = projector(tokens, mask)
        expected = projector.fc2(torch.relu(projector.fc1(tokens[1, :6].mean(0))))
        torch.testing.assert_close(out[1], expected, rtol=1e-5, atol=1e-6)
        ids, text_mask = torch.randint(1, 100, (1, 7)), torch.tensor([[1, 1, 1, 1, 0, 0, 0]])
        hidden = model.text_model(input_ids=ids, attention_mask=text_mask).last_hidden_state
        pooled = model.text_projection(hidden[0, :4].mean(0))
        text = model.get_text_features(ids, text_mask).pooler_output[0]
    torch.testing.assert_close(text, F.normalize(pooled, dim=-1), rtol=1e-5, atol=1e-6)
    assert isinstance(model.text_projection, torch.nn.Linear)


def test_clap_logit_scale_initialisation():
    assert math.isclose(tiny_clap_model().logit_scale.item(), math.log(100.0), rel_tol=1e-6)


def test_remote_code_loading_without_the_package(tmp_path):
    """A saved folder, and the shipped demo folder (its module copies and front end), load and compute as with the
    package where `import m2d2_hf` fails."""
    model = tiny_clap_model()
    model.save_pretrained(tmp_path)
    ids, features = torch.randint(1, 100, (1, 5)), torch.randn(1, 80, 150)
    with torch.no_grad():
        expected = model(input_ids=ids, input_features=features).logits_per_audio
    demo = M2D2ClapModel.from_pretrained(DEMO_MODEL).eval()
    audio = torch.sin(torch.arange(32000) / 9.0)
    demo_features = AutoFeatureExtractor.from_pretrained(DEMO_MODEL)(audio.numpy(), return_tensors="pt")
    with torch.no_grad():
        demo_expected = demo(input_ids=ids, **demo_features).logits_per_audio
    torch.save(
        {"ids": ids, "features": features, "expected": expected, "audio": audio, "demo_expected": demo_expected},
        tmp_path / "inputs.pt",
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["m2d2_hf"] = None  # make `import m2d2_hf` fail: only the folder's own code may be used
        import torch
        from transformers import AutoFeatureExtractor, AutoModel
        model = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        data = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            got = model(input_ids=data["ids"], input_features=data["features"]).logits_per_audio
        torch.testing.assert_close(got, data["expected"])
        demo = AutoModel.from_pretrained({str(DEMO_MODEL)!r}, trust_remote_code=True).eval()
        extractor = AutoFeatureExtractor.from_pretrained({str(DEMO_MODEL)!r}, trust_remote_code=True)
        assert type(demo).__module__.startswith("transformers_modules"), type(demo).__module__
        assert type(extractor).__module__.startswith("transformers_modules"), type(extractor).__module__
        with torch.no_grad():
            got = demo(input_ids=data["ids"], **extractor(data["audio"].numpy(), return_tensors="pt")).logits_per_audio
        torch.testing.assert_close(got, data["demo_expected"], atol=1e-5, rtol=0)
        print("remote-ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "remote-ok" in result.stdout
