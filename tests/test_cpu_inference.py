"""`optimize_for_cpu_inference`: prepacked Linear weights and the per-dtype attention kernel keep the numbers, fall
back to `F.linear` wherever the packed kernel does not apply, follow weight updates, and leave checkpoints alone."""

import contextlib
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from m2d2_hf import M2D2AudioModel, M2D2ClapModel, cpu_inference
from m2d2_hf.cpu_inference import (
    InPlaceM2D2Attention,
    InPlaceM2D2Layer,
    InPlaceM2D2MLP,
    PrepackedLinear,
    optimize_for_cpu_inference,
    use_in_place_blocks,
)
from m2d2_hf.modeling_m2d2 import M2D2MLP

from .test_modeling import tiny_audio_model, tiny_clap_model


pytestmark = pytest.mark.skipif(
    not cpu_inference.onednn_prepacking_available(), reason="this torch build has no oneDNN"
)

# The feature flags of the three CPU kinds this project runs on (as torch names them), for simulating each anywhere.
AVX2_ONLY = ("avx", "avx2", "fma3", "f16c")
AVX512_BF16 = AVX2_ONLY + ("avx512_f", "avx512_bw", "avx512_vl", "avx512_bf16", "avx512_vnni")  # AMD EPYC
AMX = AVX512_BF16 + ("amx_tile", "amx_bf16", "amx_int8")  # Intel Xeon 4th generation and later
# Tests that measure oneDNN's own bf16 kernels need them: without native bf16 the tuned layers never prepack bf16.
needs_native_bf16 = pytest.mark.skipif(
    not cpu_inference.cpu_has_native_bf16(), reason="measures native bf16 kernels: no avx512_bf16 / amx_bf16 here"
)
BF16_NATIVE_ONLY = pytest.param(torch.bfloat16, marks=needs_native_bf16)


def simulate_cpu(monkeypatch: pytest.MonkeyPatch, flags: tuple[str, ...]) -> None:
    """Make every CPU probe of the package (`cpu_has_native_bf16`, `cpu_has_vnni`, `cpu_has_amx`) see `flags`."""
    monkeypatch.setattr(cpu_inference, "cpu_flags", lambda: frozenset(flags))


def bf16_fallback_warning():
    """What tuning a bf16 model does on this CPU: nothing to see with native bf16, a float32 warning without."""
    if cpu_inference.cpu_has_native_bf16():
        return contextlib.nullcontext()
    return pytest.warns(UserWarning, match="no native bf16")


def features(batch: int = 2, frames: int = 250) -> torch.Tensor:
    return torch.randn(batch, 80, frames, generator=torch.Generator().manual_seed(1))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def packed_linear(in_features: int = 48, out_features: int = 40, dtype: torch.dtype = torch.float32) -> tuple:
    torch.manual_seed(0)
    plain = nn.Linear(in_features, out_features).to(dtype)
    packed = copy.deepcopy(plain)
    packed.__class__ = PrepackedLinear
    return plain, packed


@pytest.mark.parametrize("dtype", [torch.float32, BF16_NATIVE_ONLY])
def test_packed_linear_equals_linear(dtype):
    plain, packed = packed_linear(dtype=dtype)
    x = torch.randn(3, 7, 48).to(dtype)
    with torch.no_grad():
        expected, actual = plain(x), packed(x)
        strided = packed(torch.randn(7, 3, 48).to(dtype).transpose(0, 1))
    assert packed._packed is not None, "the packed kernel was not used"
    assert actual.dtype == dtype and actual.shape == expected.shape and strided.shape == expected.shape
    if dtype == torch.bfloat16:
        assert torch.equal(actual, expected)  # the same bf16 products, only the weight layout differs
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_packed_linear_follows_weight_updates_and_copies():
    plain, packed = packed_linear()
    x = torch.randn(5, 48)
    with torch.no_grad():
        packed(x)
        first = packed._packed[1]
        packed.weight.mul_(2)  # in place: the version counter moves
        plain.weight.mul_(2)
        torch.testing.assert_close(packed(x), plain(x), rtol=1e-5, atol=1e-6)
        assert packed._packed[1] is not first
        packed.load_state_dict({"weight": torch.zeros(40, 48), "bias": torch.ones(40)})
        assert torch.equal(packed(x), torch.ones(5, 40))
        # Opaque oneDNN tensors cannot be copied: copies drop the cache and repack.
        clone = copy.deepcopy(packed)
        restored = pickle.loads(pickle.dumps(packed))
        assert clone._packed is None and restored._packed is None
        assert torch.equal(clone(x), torch.ones(5, 40)) and torch.equal(restored(x), torch.ones(5, 40))


def test_packed_linear_falls_back_for_autograd_autocast_and_mismatched_inputs():
    plain, packed = packed_linear()
    x = torch.randn(4, 48, requires_grad=True)
    packed(x).sum().backward()  # the packed op has no backward: autograd takes F.linear
    plain(x.detach().requires_grad_()).sum().backward()
    assert packed._packed is None
    torch.testing.assert_close(packed.weight.grad, plain.weight.grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert packed(x).dtype == torch.bfloat16 and packed._packed is None
    with torch.no_grad():
        assert packed(torch.randn(0, 48)).shape == (0, 40)
        with pytest.raises(RuntimeError):  # a dtype mismatch fails as nn.Linear fails, not inside oneDNN
            packed(torch.randn(2, 48, dtype=torch.float64))


def test_optimized_audio_model_matches_fp32_and_bf16():
    """Tuned, an fp32 model keeps its values and a bf16 one stays within bf16 rounding of them: run in bf16 on CPUs
    with native bf16, in fp32 (with a warning) on the others."""
    model = tiny_audio_model()
    inputs = features()
    with torch.inference_mode():
        expected = model(inputs)
        fast32 = optimize_for_cpu_inference(copy.deepcopy(model))(inputs)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        plain16 = bf16(inputs)
        with bf16_fallback_warning():
            optimized16 = optimize_for_cpu_inference(bf16)
        fast16 = optimized16(inputs)
    assert relative_error(fast32.last_hidden_state, expected.last_hidden_state) < 1e-6
    assert torch.equal(fast32.token_mask, expected.token_mask)
    if cpu_inference.cpu_has_native_bf16():
        assert optimized16.dtype == torch.bfloat16
        assert optimized16.config._attn_implementation == cpu_inference.bf16_attention_for_this_cpu()
    else:
        assert optimized16.dtype == torch.float32 and optimized16.config._attn_implementation == "sdpa"
    assert all(type(m) is PrepackedLinear for m in optimized16.modules() if isinstance(m, nn.Linear))
    assert relative_error(fast16.pooler_output, plain16.pooler_output) < 1e-2
    assert F.cosine_similarity(fast16.pooler_output.float(), expected.pooler_output).min() > 0.999


def test_bf16_model_is_tuned_in_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    """On an AVX2-only CPU a bf16 model is cast to fp32 (with a warning) and its weights are prepacked in fp32: oneDNN
    refuses to prepack bf16 there, and emulated bf16 runs slower than fp32. A tuned Linear that is bf16 anyway
    (cast after tuning) computes `F.linear` instead of prepacking."""
    simulate_cpu(monkeypatch, AVX2_ONLY)
    model = tiny_audio_model()
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    reference = copy.deepcopy(bf16).to(torch.float32)  # the same (bf16-rounded) weights, in fp32
    with pytest.warns(UserWarning, match="no native bf16 .*cast to float32; load it in float32"):
        optimized = optimize_for_cpu_inference(bf16)
    assert optimized is bf16 and optimized.dtype == torch.float32
    assert optimized.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        expected, actual = reference(features()), optimized(features())
    assert relative_error(actual.last_hidden_state, expected.last_hidden_state) < 1e-5
    linears = [m for m in optimized.modules() if type(m) is PrepackedLinear]
    assert linears and all(m._packed is not None and m._packed[0][1] == torch.float32 for m in linears)

    plain, packed = packed_linear(dtype=torch.bfloat16)
    x = torch.randn(3, 7, 48).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), plain(x), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(packed.forward_gelu(x), F.gelu(plain(x)), rtol=1e-2, atol=1e-2)
    assert packed._packed is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fp32 models are tuned silently on every CPU
        assert optimize_for_cpu_inference(tiny_audio_model()).dtype == torch.float32


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_in_place_blocks_equal_the_model_blocks_bit_for_bit(hidden_act):
    """The swapped blocks add residuals (and apply the exact GELU) in place without autograd: the same values, inputs
    never written; with autograd, and for a GELU that `gelu_` does not compute, they are the model's own blocks."""
    model = tiny_audio_model(hidden_act=hidden_act)
    swapped = use_in_place_blocks(copy.deepcopy(model))
    layers = swapped.layers
    assert all(type(layer) is InPlaceM2D2Layer for layer in layers)
    assert all(type(layer.attention) is InPlaceM2D2Attention for layer in layers)
    expected_mlp = InPlaceM2D2MLP if hidden_act == "gelu" else M2D2MLP
    assert all(type(layer.mlp) is expected_mlp for layer in layers)
    x = features()
    with torch.no_grad():
        expected = model(x, output_hidden_states=True)
    with torch.inference_mode():
        inference = swapped(x.clone(), output_hidden_states=True)
    with_grad = swapped(x, output_hidden_states=True)
    assert with_grad.last_hidden_state.requires_grad
    for actual in (inference, with_grad):
        outputs = actual.hidden_states + (actual.last_hidden_state,)
        for a, b in zip(outputs, expected.hidden_states + (expected.last_hidden_state,), strict=True):
            assert torch.equal(a.detach(), b)
    assert torch.equal(x, features())  # inputs are never written
    assert type(optimize_for_cpu_inference(copy.deepcopy(model)).layers[0]) is InPlaceM2D2Layer


def test_optimized_fp32_model_keeps_sdpa_and_trains_as_before():
    model = tiny_audio_model()
    optimized = optimize_for_cpu_inference(copy.deepcopy(model)).train()
    assert optimized.config._attn_implementation == "sdpa"
    inputs = features(frames=200)
    model.train()
    model(inputs).pooler_output.square().sum().backward()
    optimized(inputs).pooler_output.square().sum().backward()
    for (name, a), (_, b) in zip(model.named_parameters(), optimized.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_optimized_clap_model_saves_plain_checkpoints(tmp_path):
    model = tiny_clap_model()
    with bf16_fallback_warning():
        optimized = optimize_for_cpu_inference(copy.deepcopy(model).to(torch.bfloat16))
    ids = torch.tensor([[2, 5, 7, 3], [2, 9, 3, 0]])
    with torch.inference_mode():
        out = optimized(input_ids=ids, attention_mask=(ids > 0).long(), input_features=features())
        reference = model(input_ids=ids, attention_mask=(ids > 0).long(), input_features=features())
    assert F.cosine_similarity(out.audio_embeds.float(), reference.audio_embeds).min() > 0.99
    assert F.cosine_similarity(out.text_embeds.float(), reference.text_embeds).min() > 0.99
    optimized.save_pretrained(tmp_path)
    reloaded = M2D2ClapModel.from_pretrained(tmp_path)
    assert set(reloaded.state_dict()) == set(model.state_dict())
    assert all(type(m) is nn.Linear for m in reloaded.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(  # bf16 weights, kept in float32 where the CPU has no native bf16
        reloaded.audio_model.layers[0].mlp.fc1.weight,
        model.audio_model.layers[0].mlp.fc1.weight.to(torch.bfloat16).to(optimized.dtype),
    )
    assert reloaded.config._attn_implementation == "sdpa"  # the tuning is not saved with the model


def test_missing_onednn_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="oneDNN"):
        optimize_for_cpu_inference(M2D2AudioModel(tiny_audio_model().config))


def test_readme_snippet_runs_the_pipeline_on_an_optimized_bf16_model():
    """The README's recipe, on the shipped demo model: the tuned bf16 model ranks labels as the fp32 one does."""
    from transformers import pipeline

    from .test_demo_model import DEMO_MODEL

    classifier = pipeline("zero-shot-audio-classification", model=str(DEMO_MODEL), dtype=torch.bfloat16)
    with bf16_fallback_warning():
        model = optimize_for_cpu_inference(classifier.model)
    assert model is classifier.model
    assert model.dtype == (torch.bfloat16 if cpu_inference.cpu_has_native_bf16() else torch.float32)
    reference = pipeline("zero-shot-audio-classification", model=str(DEMO_MODEL))
    labels = ["dog", "telephone", "rain", "speech digit"]
    audio = torch.randn(48000, generator=torch.Generator().manual_seed(2)).numpy() * 0.1
    fast, slow = classifier(audio, candidate_labels=labels), reference(audio, candidate_labels=labels)
    assert type(model.audio_model.layers[0].mlp.fc1) is PrepackedLinear
    assert [r["label"] for r in fast][0] == [r["label"] for r in slow][0]
    assert sum(r["score"] for r in fast) == pytest.approx(1.0, abs=1e-2)


def test_a_model_off_the_cpu_is_a_clear_error():
    model = tiny_audio_model().to("meta")
    with pytest.raises(ValueError, match="on the CPU, but this one is on meta"):
        optimize_for_cpu_inference(model)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize(("flags", "expected"), [(AMX, "sdpa"), (AVX512_BF16, "eager")])
def test_bf16_attention_follows_the_cpu(monkeypatch, flags, expected):
    """bf16 models get the attention measured faster on their CPU kind: SDPA with AMX tiles, eager without."""
    simulate_cpu(monkeypatch, flags)
    model = tiny_audio_model().to(torch.bfloat16)
    assert optimize_for_cpu_inference(model).config._attn_implementation == expected
    assert optimize_for_cpu_inference(tiny_audio_model()).config._attn_implementation == "sdpa"  # fp32: always


@pytest.mark.parametrize(
    ("flags", "amx", "native_bf16", "vnni"),
    [
        (AVX2_ONLY, False, False, False),
        (AVX512_BF16, False, True, True),
        (AMX, True, True, True),
        (AVX2_ONLY + ("avx_vnni",), False, False, True),  # Intel client cores: VNNI without AVX-512
        (AVX2_ONLY + ("avx512_f", "avx512_bw"), False, False, False),  # AVX-512 alone emulates bf16
        (("neon", "bf16", "i8mm"), False, True, False),  # aarch64 with the BF16 extension
    ],
)
def test_cpu_probes_read_the_flags(monkeypatch, flags, amx, native_bf16, vnni):
    simulate_cpu(monkeypatch, flags)
    probes = cpu_inference.cpu_has_amx(), cpu_inference.cpu_has_native_bf16(), cpu_inference.cpu_has_vnni()
    assert probes == (amx, native_bf16, vnni)


def test_cpu_flags_agree_with_proc_cpuinfo(monkeypatch):
    """torch's probe and the /proc/cpuinfo fallback (older torch) see the same features the tuning decides on."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = set(next(line for line in cpuinfo if line.startswith("flags")).partition(":")[2].split())
    except (OSError, StopIteration):
        pytest.skip("no x86 /proc/cpuinfo flags to compare with")
    probed = cpu_inference.cpu_flags()  # cached before the probe is hidden below
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    assert cpu_inference.cpu_flags.__wrapped__() == flags
    decisive = cpu_inference.NATIVE_BF16_FLAGS | cpu_inference.VNNI_FLAGS | {"amx_tile"}
    assert decisive & probed == decisive & flags


@pytest.mark.parametrize("dtype", [torch.float32, BF16_NATIVE_ONLY])
def test_packed_linear_post_ops_equal_separate_ops(dtype):
    """`forward_gelu` / `forward_add` (GELU and residual inside the oneDNN kernel) equal the separate ops: to fp32
    rounding in fp32, to one bf16 rounding in bf16, and they fall back to them under autograd."""
    plain, packed = packed_linear(dtype=dtype)
    x, residual = torch.randn(3, 7, 48).to(dtype), torch.randn(3, 7, 40).to(dtype)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    with torch.inference_mode():
        torch.testing.assert_close(packed.forward_gelu(x), F.gelu(plain(x)), **tolerance)
        torch.testing.assert_close(packed.forward_add(x, residual), plain(x) + residual, **tolerance)
    assert packed._packed is not None, "the packed kernel was not used"
    x.requires_grad_(True)
    (packed.forward_gelu(x).sum() + packed.forward_add(x, residual).sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_optimized_mlp_fuses_gelu_and_residual_and_keeps_fp32_values():
    model = tiny_audio_model()
    optimized = optimize_for_cpu_inference(copy.deepcopy(model))
    x = features()
    with torch.inference_mode():
        expected, actual = model(x).last_hidden_state, optimized(x).last_hidden_state
    assert relative_error(actual, expected) < 1e-5


def test_optimized_attention_fuses_its_residual_and_still_reports_attentions():
    """The tuned block hands the attention its residual, which a prepacked `proj` adds inside its kernel: the same
    fp32 values, and `output_attentions=True` still records each layer's weights (transformers' hooks on the
    attention module fire as before)."""
    model = tiny_audio_model().eval()
    model.set_attn_implementation("eager")
    optimized = optimize_for_cpu_inference(copy.deepcopy(model))
    calls = []
    original = PrepackedLinear.forward_add
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PrepackedLinear, "forward_add", lambda self, *a: calls.append(self) or original(self, *a))
        with torch.inference_mode():
            expected = model(features(), output_attentions=True)
            actual = optimized(features(), output_attentions=True)
    assert {id(layer.attention.proj) for layer in optimized.layers} <= {id(linear) for linear in calls}
    assert relative_error(actual.last_hidden_state, expected.last_hidden_state) < 1e-5
    assert len(actual.attentions) == len(expected.attentions) == model.config.num_hidden_layers
    for a, b in zip(actual.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
