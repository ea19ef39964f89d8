"""The performance paths compute the same numbers: window-by-window long audio equals the whole clip (log-mel at the
window cuts included), packed chunk batches equal encoding chunk by chunk, the in-place inference fast path equals
the autograd path, and bf16 (also tuned for CPU inference) stays within cosine 0.999 of fp32 on real clips with
the full-size model."""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from m2d2_hf import M2D2AudioModel, M2D2ClapModel, M2D2FeatureExtractor
from m2d2_hf.cpu_inference import cpu_has_native_bf16, onednn_prepacking_available, optimize_for_cpu_inference
from m2d2_hf.long_audio import WindowedLogMel, embed_long_audio

from .test_cpu_inference import bf16_fallback_warning
from .test_modeling import tiny_clap_model


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def tiny_clap(**overrides) -> M2D2ClapModel:
    model = tiny_clap_model(**overrides)
    with torch.no_grad():  # random positions and projector token: a wrong column, chunk or key shows in the outputs
        model.audio_model.embeddings.position_embeddings.normal_()
        if hasattr(model.audio_projection, "sem_token"):
            model.audio_projection.sem_token.normal_()
    return model


def make_audio(seconds: float, seed: int = 0) -> torch.Tensor:
    """Noise with a near-silent stretch (the bins where rounding differences would show most in log space)."""
    generator = torch.Generator().manual_seed(seed)
    wave = torch.randn(int(seconds * 16000), generator=generator) * 0.1
    wave[16000:40000] *= 1e-5
    return wave


def test_windowed_log_mel_equals_the_whole_clip_at_every_cut():
    fe = M2D2FeatureExtractor(norm_stats=[-7.261779308319092, 4.3511505126953125])
    wave = make_audio(31.3)
    whole = fe(wave, sampling_rate=16000, return_tensors="pt")["input_features"][0]
    windows = WindowedLogMel(fe, wave, min_frames=1001)
    assert windows.num_frames == whole.shape[-1] == 1 + len(wave) // 160
    # Chunk-aligned windows as embed_long_audio cuts them (the last ones short), and arbitrary cuts.
    for cuts in ([0, 1001, 2002, 3003, whole.shape[-1]], [0, 2002, whole.shape[-1]], [0, 7, 500, 3130, 3131]):
        pieces = torch.cat([windows(a, b) for a, b in zip(cuts[:-1], cuts[1:])], dim=-1)
        torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-6)
    # The chunk-aligned windows of the streaming path are bit for bit the whole clip's on this CPU.
    assert torch.equal(
        torch.cat([windows(s, min(s + 2002, whole.shape[-1])) for s in range(0, 3131, 2002)], -1), whole
    )

    # Without the neighbouring samples (each window reflect-padded on its own), the frames at the cut differ.
    # Frame 1000 reads samples [159800, 160200): past the naive window's end at 160160.
    naive = fe(wave[: 1001 * 160], sampling_rate=16000, return_tensors="pt")["input_features"][0]
    assert (naive[:, 1000] - whole[:, 1000]).abs().max() > 1e-3
    torch.testing.assert_close(naive[:, :1000], whole[:, :1000], rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunks_per_window", [1, 2, 100])
def test_embed_long_audio_equals_the_whole_clip(chunks_per_window):
    model = tiny_clap()
    fe = M2D2FeatureExtractor()
    wave = make_audio(13.37)  # 2138 frames: chunks of 208 frames, the last one partial (58 frames → 4 columns)
    with torch.no_grad():
        features = fe(wave, sampling_rate=16000, return_tensors="pt")
        whole = model.audio_model(**features)
        clap = model.get_audio_features(**features).pooler_output
    out = model.embed_long_audio(
        wave, 16000, feature_extractor=fe, chunks_per_window=chunks_per_window, return_last_hidden_state=True
    )
    assert out.frame_features.shape == whole.frame_features.shape
    assert out.last_hidden_state.shape == whole.last_hidden_state.shape
    assert relative_error(out.frame_features, whole.frame_features) <= 1e-5
    assert relative_error(out.last_hidden_state, whole.last_hidden_state) <= 1e-5
    assert relative_error(out.pooler_output, whole.pooler_output) <= 1e-5
    assert relative_error(out.audio_embeds, clap) <= 1e-5
    assert out.audio_embeds.norm(dim=-1).sub(1).abs().max() < 1e-5


def test_embed_long_audio_options_and_other_projectors():
    fe = M2D2FeatureExtractor()
    wave = make_audio(9.0, seed=1)
    with torch.no_grad():
        features = fe(wave, sampling_rate=16000, return_tensors="pt")
    # The audio model alone: no CLAP embedding; frame features only when asked.
    audio = tiny_clap().audio_model
    out = audio.embed_long_audio(wave, 16000, feature_extractor=fe, chunks_per_window=2, return_frame_features=False)
    assert out.frame_features is None and out.audio_embeds is None and out.last_hidden_state is None
    with torch.no_grad():
        assert relative_error(out.pooler_output, audio(**features).pooler_output) <= 1e-5
    # A two-block semantic projector (tokens collected) and the 2024 MLP projector (token mean).
    for overrides in ({"projector_num_layers": 2}, {"audio_projector_type": "mlp"}):
        model = tiny_clap(**overrides)
        with torch.no_grad():
            expected = model.get_audio_features(**features).pooler_output
        actual = embed_long_audio(model, wave, 16000, feature_extractor=fe, chunks_per_window=2).audio_embeds
        assert relative_error(actual, expected) <= 1e-5, overrides
    # Audio at another rate is resampled once, whole, as the feature extractor does it.
    wave48 = make_audio(9.0, seed=2).repeat_interleave(3)
    with torch.no_grad():
        expected = audio(**fe(wave48, sampling_rate=48000, return_tensors="pt")).pooler_output
    assert relative_error(audio.embed_long_audio(wave48, 48000, feature_extractor=fe).pooler_output, expected) <= 1e-5
    with pytest.raises(ValueError, match="one recording"):
        embed_long_audio(model, [wave, wave], 16000)
    with pytest.raises(ValueError, match="chunks_per_window"):
        embed_long_audio(model, wave, 16000, chunks_per_window=0)


def test_packed_chunks_equal_chunk_by_chunk_encoding():
    """A batch of clips of different lengths, packed into one chunk batch with key-padding masks, against the
    original runtime's loop: each clip zero-padded to whole patches, each chunk encoded in its own forward."""
    model = tiny_clap().audio_model
    config = model.config
    torch.manual_seed(1)
    lengths = [1001, 208, 50, 433, 624]
    features = torch.randn(len(lengths), config.num_mel_bins, max(lengths))
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        packed = model(features, mask.long())
        for clip, frames in enumerate(lengths):
            clip_features = features[clip : clip + 1, :, :frames]
            width, unit = config.patch_size[1], config.chunk_frames
            padded = F.pad(clip_features, (0, (width - frames % unit % width) % width))
            chunks = [model(padded[..., s : s + unit]) for s in range(0, frames, unit)]
            tokens = torch.cat([c.last_hidden_state for c in chunks], 1)
            frame_features = torch.cat([c.frame_features for c in chunks], 1)
            assert math.ceil(frames / unit) == len(chunks)
            n_tokens, n_frames = int(packed.token_mask[clip].sum()), int(packed.frame_mask[clip].sum())
            assert (n_tokens, n_frames) == (tokens.shape[1], frame_features.shape[1])
            assert relative_error(packed.last_hidden_state[clip, :n_tokens], tokens[0]) <= 1e-5
            assert relative_error(packed.frame_features[clip, :n_frames], frame_features[0]) <= 1e-5
            assert relative_error(packed.pooler_output[clip], frame_features[0].mean(0)) <= 1e-5


def test_inference_fast_path_equals_the_autograd_path():
    """Without autograd the layers add residuals and apply GELU in place: the same values, bit for bit."""
    model = tiny_clap().audio_model
    features = torch.randn(2, 80, 300)
    with torch.no_grad():
        fast = model(features, output_hidden_states=True)
    slow = model(features, output_hidden_states=True)  # grad mode: parameters require grad, out-of-place path
    assert slow.last_hidden_state.requires_grad
    for a, b in zip(fast.hidden_states + (fast.last_hidden_state,), slow.hidden_states + (slow.last_hidden_state,)):
        assert torch.equal(a, b.detach())
    fast_input = features.clone()
    with torch.inference_mode():
        model(fast_input)
    assert torch.equal(fast_input, features)  # inputs are never written


def test_bf16_models_take_float32_features(tmp_path):
    """`model(**feature_extractor(...))` works on a `dtype=torch.bfloat16` model without casting the features."""
    model = tiny_clap()
    model.save_pretrained(tmp_path)
    bf16 = M2D2ClapModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    audio_bf16 = M2D2AudioModel.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert bf16.audio_model.layernorm.weight.dtype == torch.bfloat16
    inputs = M2D2FeatureExtractor()(
        [make_audio(3.0).numpy(), make_audio(5.0, seed=3).numpy()], sampling_rate=16000, return_tensors="pt"
    )
    assert inputs["input_features"].dtype == torch.float32
    ids = torch.tensor([[1, 7, 8, 2], [1, 9, 2, 0]])
    with torch.no_grad():
        outputs = bf16(input_ids=ids, attention_mask=(ids > 0).long(), **inputs)
        audio_out = audio_bf16(**inputs)
        reference = model.get_audio_features(**inputs).pooler_output
    assert outputs.audio_embeds.dtype == audio_out.pooler_output.dtype == torch.bfloat16
    assert F.cosine_similarity(outputs.audio_embeds.float(), reference).min() > 0.99
    long_out = bf16.embed_long_audio(make_audio(12.0), 16000, chunks_per_window=2)
    assert long_out.audio_embeds.dtype == torch.bfloat16 and torch.isfinite(long_out.audio_embeds.float()).all()


def real_clips(real_sounds_dir, count: int = 24) -> list[tuple[np.ndarray, int]]:
    import soundfile as sf

    with open(real_sounds_dir / "metadata.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: row["file_name"])
    clips = []
    for row in rows[:: max(1, len(rows) // count)][:count]:
        data, rate = sf.read(str(real_sounds_dir / row["file_name"]), dtype="float32", always_2d=True)
        clips.append((data.mean(1), rate))
    return clips


@pytest.mark.slow
def test_bf16_embeddings_match_fp32_on_real_clips(converted_dir, real_sounds_dir):
    """The full-size converted model in bf16 (as loaded, and tuned by `optimize_for_cpu_inference`) against fp32:
    clip embeddings and CLAP embeddings of real recordings (each clip alone at its own rate, resampled by the feature
    extractor) within cosine 0.999. Without native bf16 the tuned model runs in fp32 (its bf16-rounded weights)."""
    from transformers import AutoFeatureExtractor

    fe = AutoFeatureExtractor.from_pretrained(converted_dir)
    inputs = [
        fe(samples, sampling_rate=rate, return_tensors="pt")
        for samples, rate in real_clips(real_sounds_dir)
        if len(samples) * 16000 // rate >= fe.min_samples
    ]
    assert len(inputs) >= 16

    def embeddings(model: M2D2ClapModel) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(clip embedding, CLAP embedding) of each clip; the clip embedding (the audio model's pooler_output) is
        the mean of the frame features."""
        with torch.inference_mode():
            outputs = [model.get_audio_features(**clip) for clip in inputs]
        return [(out.frame_features.float().mean(1), out.pooler_output.float()) for out in outputs]

    def bf16_model() -> M2D2ClapModel:
        return M2D2ClapModel.from_pretrained(converted_dir, dtype=torch.bfloat16).eval()

    def bf16_optimized() -> M2D2ClapModel:
        with bf16_fallback_warning():
            model = optimize_for_cpu_inference(bf16_model())
        assert model.dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
        return model

    # One full-size model in memory at a time: the float32 reference first, then each variant.
    expected = embeddings(M2D2ClapModel.from_pretrained(converted_dir).eval())
    variants = {"bf16": bf16_model, **({"bf16 optimized": bf16_optimized} if onednn_prepacking_available() else {})}
    for name, load in variants.items():
        got = embeddings(load())
        clip_cosines = [F.cosine_similarity(g[0], e[0]).item() for g, e in zip(got, expected)]
        clap_cosines = [F.cosine_similarity(g[1], e[1]).item() for g, e in zip(got, expected)]
        assert min(clip_cosines) >= 0.999, (name, clip_cosines)
        assert min(clap_cosines) >= 0.999, (name, clap_cosines)


@pytest.mark.slow
def test_embed_long_audio_with_the_full_size_model(converted_dir):
    """A 25 s recording window by window through the converted full-size model equals get_audio_features."""
    from transformers import AutoFeatureExtractor

    fe = AutoFeatureExtractor.from_pretrained(converted_dir)
    model = M2D2ClapModel.from_pretrained(converted_dir).eval()
    wave = make_audio(25.0, seed=4)
    with torch.inference_mode():
        inputs = fe(wave, sampling_rate=16000, return_tensors="pt")
        expected = model.get_audio_features(**inputs)
        whole = model.audio_model(**inputs)
    out = model.embed_long_audio(wave, 16000, feature_extractor=fe, chunks_per_window=1)
    assert relative_error(out.frame_features, whole.frame_features) <= 1e-5
    assert relative_error(out.pooler_output, whole.pooler_output) <= 1e-5
    assert relative_error(out.audio_embeds, expected.pooler_output) <= 1e-5
