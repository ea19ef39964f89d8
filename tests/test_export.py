"""torch.export of the audio encoder, the CLAP audio path and the classifier on unpadded batches of equal-length clips
(the path every transformers exporter goes through), with a static shape, a dynamic batch, or a dynamic batch and time
axis; short clips and ragged batches through the eager model."""

import pytest
import torch
from torch import nn

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2ClapModel, M2D2Config, M2D2ForAudioClassification


# chunk_frames=100: a 250-frame input is two full chunks (6 columns each) and a 50-frame last chunk (4 columns).
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, chunk_frames=100)
TOLERANCE = 1e-5


class AudioEmbedding(nn.Module):
    """The CLAP audio path as a module torch.export takes: waveform features in, normalised CLAP embedding out."""

    def __init__(self, model: M2D2ClapModel):
        super().__init__()
        self.model = model

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        return self.model.get_audio_features(input_features).pooler_output


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    clap = M2D2ClapModel(
        M2D2Config(
            audio_config=TINY,
            text_config=dict(
                model_type="bert",
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                vocab_size=100,
            ),
            projection_dim=32,
            projector_intermediate_size=32,
        )
    )
    return {
        "audio": M2D2AudioModel(M2D2AudioConfig(**TINY)).eval(),
        "clap": AudioEmbedding(clap).eval(),
        "classifier": M2D2ForAudioClassification(M2D2AudioConfig(**TINY, num_labels=3)).eval(),
    }


def leaves(output) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


def max_error(expected, actual) -> float:
    pairs = list(zip(leaves(expected), leaves(actual), strict=True))
    return max((e.float() - a.float()).abs().max().item() for e, a in pairs if e.numel())


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, nn.Module]:
    return models()


@pytest.mark.parametrize("name", ["audio", "clap", "classifier"])
def test_export_static_and_dynamic_batch_equals_eager(tiny_models, name):
    model = tiny_models[name]
    example = torch.randn(2, 80, 250)
    batch = torch.export.Dim("batch", min=1, max=64)
    static = torch.export.export(model, (example,))
    dynamic = torch.export.export(model, (example,), dynamic_shapes={"input_features": {0: batch}})
    with torch.no_grad():
        assert max_error(model(example), static.module()(example)) <= TOLERANCE
        for size in (1, 3):
            other = torch.randn(size, 80, 250)
            assert max_error(model(other), dynamic.module()(other)) <= TOLERANCE


@pytest.mark.parametrize("name", ["audio", "clap", "classifier"])
def test_export_with_dynamic_batch_and_time_equals_eager(tiny_models, name):
    """One program for any number of frames: one short chunk, exactly one chunk, the chunk boundary, many chunks
    (1234 frames: twelve full 100-frame chunks and a partial one, the tiny model's counterpart of clips > 10 s)."""
    model = tiny_models[name]
    dims = {"input_features": {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("frames")}}
    program = torch.export.export(model, (torch.randn(2, 80, 250),), dynamic_shapes=dims).module()
    with torch.no_grad():
        for batch, frames in [(1, 1), (3, 30), (2, 100), (1, 101), (2, 296), (1, 1234)]:
            features = torch.randn(batch, 80, frames)
            expected, got = model(features), program(features)
            assert [t.shape for t in leaves(expected)] == [t.shape for t in leaves(got)]
            assert max_error(expected, got) <= TOLERANCE, (batch, frames)


def test_exported_program_takes_an_all_ones_mask_and_refuses_padding(tiny_models):
    model = tiny_models["audio"]
    features, mask = torch.randn(2, 80, 250), torch.ones(2, 250, dtype=torch.long)
    program = torch.export.export(model, (features, mask)).module()
    with torch.no_grad():
        assert max_error(model(features), program(features, mask)) <= TOLERANCE
        mask[1, 200:] = 0
        with pytest.raises(RuntimeError, match="unpadded batches only"):
            program(features, mask)


@pytest.mark.parametrize("frames", [30, 100, 250, 301])
def test_unpadded_path_equals_the_packed_path(tiny_models, frames):
    """No mask (the exportable path) and a ragged batch holding the same clip (the packed path) agree."""
    model = tiny_models["audio"]
    features = torch.randn(1, 80, frames)
    ragged = torch.cat([features, torch.zeros(1, 80, 7)], -1).expand(2, -1, -1).clone()
    mask = torch.ones(2, frames + 7, dtype=torch.long)
    mask[0, frames:] = 0
    with torch.no_grad():
        unpadded, packed = model(features, output_hidden_states=True), model(ragged, mask, output_hidden_states=True)
    n_tokens = unpadded.last_hidden_state.shape[1]
    assert int(packed.token_mask[0].sum()) == n_tokens
    for got, expected in [
        (unpadded.last_hidden_state, packed.last_hidden_state[:1, :n_tokens]),
        (unpadded.pooler_output, packed.pooler_output[:1]),
    ]:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for got, expected in zip(unpadded.hidden_states, packed.hidden_states, strict=True):
        torch.testing.assert_close(got, expected[:1, :n_tokens], rtol=1e-5, atol=1e-5)


def test_a_short_clip_does_not_abort_its_batch(tiny_models):
    from m2d2_hf import M2D2FeatureExtractor

    fe, model = M2D2FeatureExtractor(), tiny_models["audio"]
    rng = torch.Generator().manual_seed(0)
    clips = [torch.rand(16000, generator=rng) - 0.5, torch.rand(1600, generator=rng) - 0.5]  # 1 s and 0.1 s
    with torch.no_grad():
        batch = model(**fe(clips, sampling_rate=16000, return_tensors="pt"))
        alone = model(**fe(clips[1], sampling_rate=16000, return_tensors="pt"))
    assert alone.frame_features.shape[1] == 1 and torch.isfinite(batch.pooler_output).all()
    torch.testing.assert_close(batch.pooler_output[1], alone.pooler_output[0], rtol=1e-5, atol=1e-5)
