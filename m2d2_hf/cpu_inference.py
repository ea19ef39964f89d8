"""CPU inference tuning: Linear weights prepacked for oneDNN, and the attention kernel that is fastest per dtype.

On the 2-core AVX512-BF16 machine of `benchmarks/README.md`, the ViT-B encoder spends most of its time in the
Linear layers (80 % of a bf16 forward in the profiler). `F.linear` hands oneDNN / MKL the weight in its `nn.Linear`
layout on every call; a weight reordered once into oneDNN's blocked layout runs those matmuls ~19 % faster
(bf16: bit for bit the same products; fp32: ~1e-7 relative, a different accumulation order). In bf16, the eager
attention (one batched matmul, a softmax that accumulates in float32 internally, another matmul) beats SDPA's CPU
flash kernel (12 vs 19 ms per layer for 8 x 311 tokens), while in fp32 SDPA wins (its blocks avoid materialising
the 37 MB score tensor). On CPUs with AMX tiles (Intel Xeon 4th generation and later) the bf16 SDPA kernel wins
instead (8 x 10 s ViT-B: 0.36 s prepacked with SDPA against 0.49 s with eager attention and 0.39 s as loaded, on a
2-core Xeon with AMX), so bf16 models keep SDPA there. Inference only: with autograd, under autocast, or off the CPU
the layers fall back to `F.linear`.

bf16 only pays on CPUs that compute it natively (AVX512-BF16 or AMX-BF16; `cpu_has_native_bf16`). Elsewhere (AVX2
only, e.g. older AMD EPYC) oneDNN cannot prepack bf16 weights at all and bf16 autocast ran 6x slower than fp32
(emulated), so `optimize_for_cpu_inference` runs bf16 models in fp32 there.

Without autograd the transformer blocks also need no copy of their inputs: `InPlaceM2D2Layer` adds each residual
into the fresh output of its branch and `InPlaceM2D2MLP` applies GELU to `fc1`'s fresh output in place (bit for bit
the same sums and values; ~8 % faster on the CPU, fewer page faults); with prepacked Linear layers the GELU and both
residual sums run inside the `fc1`, `fc2` and attention `proj` oneDNN kernels (post-ops: one pass less each). The
model's own blocks stay out-of-place, as timm's `Block`; these are swapped in by `optimize_for_cpu_inference` like
the prepacked Linear.
"""

import functools
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .modeling_m2d2 import M2D2MLP, M2D2Attention, M2D2Layer


PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def onednn_prepacking_available() -> bool:
    """Whether this torch build has oneDNN and the (inductor's) prepacked-Linear ops."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# The CPU feature names (as torch and Linux's /proc/cpuinfo spell them) of native bf16 matmuls: x86 AVX512-BF16 and
# AMX-BF16, and the aarch64 BF16 extension; and of the int8 dot products that keep onnxruntime's u8s8 kernels from
# saturating: AVX512-VNNI, AVX-VNNI, AMX-INT8.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags of this CPU: torch's probe (`torch.cpu.get_capabilities`, in recent torch releases), else the
    first `flags` / `Features` line of /proc/cpuinfo; empty where neither tells (then no native bf16 and no VNNI is
    assumed, the choices that are safe on every CPU). Cached: the probes below run on every forward."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe is not None:
        return frozenset(name for name, value in probe().items() if value is True)
    try:
        with Path("/proc/cpuinfo").open() as cpuinfo:
            line = next(line for line in cpuinfo if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles."""
    return "amx_tile" in cpu_flags()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls natively (AVX512-BF16, AMX-BF16 or aarch64 BF16); elsewhere bf16 is
    emulated, slower than fp32, and oneDNN cannot prepack bf16 weights on AVX2-only CPUs."""
    return not NATIVE_BF16_FLAGS.isdisjoint(cpu_flags())


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI int8 dot products (AVX512-VNNI, AVX-VNNI or AMX-INT8)."""
    return not VNNI_FLAGS.isdisjoint(cpu_flags())


def bf16_attention_for_this_cpu() -> str:
    """The faster attention implementation for a bf16 model on this CPU: "sdpa" with AMX tiles, "eager" without
    (AVX512-BF16 only, e.g. AMD EPYC), as measured in `benchmarks/README.md`."""
    return "sdpa" if cpu_has_amx() else "eager"


class PrepackedLinear(nn.Linear):
    """An `nn.Linear` that keeps a copy of its weight in oneDNN's blocked layout for inference on the CPU.

    The parameters, state dict and saved checkpoints are those of `nn.Linear`. The packed copy is rebuilt whenever the
    weight changes (in-place update, `load_state_dict`, `.to()`), and it is never pickled or deep-copied. Instances
    are made by `optimize_for_cpu_inference`, which changes the class of existing `nn.Linear` modules so that their
    parameter objects, hooks and tied weights stay as they are.
    """

    _packed: tuple | None = None

    def _packed_weight(self) -> torch.Tensor:
        weight = self.weight
        # Inference tensors (made under `torch.inference_mode()`) carry no version counter: there, only a new
        # tensor (`load_state_dict` with assign, `.to()`) is noticed, not an in-place write.
        version = None if weight.is_inference() else weight._version
        key = (weight.device, weight.dtype, weight.data_ptr(), version)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None))
        return self._packed[1]

    def _can_use_packed(self, hidden_states: torch.Tensor) -> bool:
        weight = self.weight
        return (
            weight.device.type == "cpu"
            and weight.dtype in PACKABLE_DTYPES
            and (weight.dtype != torch.bfloat16 or cpu_has_native_bf16())
            and hidden_states.dtype == weight.dtype
            and hidden_states.device.type == "cpu"
            and hidden_states.numel() > 0
            and not (torch.is_grad_enabled() and (weight.requires_grad or hidden_states.requires_grad))
            and not torch.is_autocast_enabled("cpu")
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._can_use_packed(hidden_states):
            return F.linear(hidden_states, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(hidden_states, self._packed_weight(), bias, "none", [], "")

    def forward_gelu(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """GELU (exact, erf) of the output: applied by oneDNN to the accumulator, so one pass less over the output
        (fp32: the same values as `F.gelu` of `forward`; bf16: rounded once instead of twice)."""
        if not self._can_use_packed(hidden_states):
            return F.gelu(F.linear(hidden_states, self.weight, self.bias))
        bias = None if self.bias is None else self.bias.detach()
        return torch.ops.mkldnn._linear_pointwise(hidden_states, self._packed_weight(), bias, "gelu", [], "none")

    def forward_add(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The output plus `residual` (of the output's shape and dtype), added by oneDNN to the accumulator: one pass
        less (fp32: the same sums as `forward(...) + residual`; bf16: rounded once instead of twice)."""
        if not self._can_use_packed(hidden_states) or residual.dtype != self.weight.dtype:
            return F.linear(hidden_states, self.weight, self.bias) + residual
        bias = None if self.bias is None else self.bias.detach()
        packed = self._packed_weight()
        return torch.ops.mkldnn._linear_pointwise.binary(hidden_states, residual, packed, bias, "add")

    def __getstate__(self) -> dict:
        # oneDNN's opaque tensors have no storage to copy: deep copies and pickles repack on their first call.
        state = self.__dict__.copy()
        state.pop("_packed", None)
        return state


class InPlaceM2D2Layer(M2D2Layer):
    """An `M2D2Layer` that, without autograd, writes each residual sum into its branch's fresh output."""

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
    ) -> torch.Tensor:
        if isinstance(self.attention, InPlaceM2D2Attention):
            hidden_states, _ = self.attention(
                self.norm1(hidden_states), attention_mask, residual=hidden_states, **kwargs
            )
        else:
            hidden_states = hidden_states + self.attention(self.norm1(hidden_states), attention_mask, **kwargs)[0]
        if hidden_states.requires_grad:
            return hidden_states + self.mlp(self.norm2(hidden_states))
        # The branch outputs are new tensors nobody else holds; the input `hidden_states` is never written.
        if isinstance(self.mlp, InPlaceM2D2MLP):
            return self.mlp(self.norm2(hidden_states), residual=hidden_states)
        return self.mlp(self.norm2(hidden_states)).add_(hidden_states)


class InPlaceM2D2Attention(M2D2Attention):
    """An `M2D2Attention` that, given the block's `residual` (without autograd), returns the projection plus it: added
    inside a prepacked `proj`'s oneDNN kernel, or into its fresh output."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        heads, attn_weights = self.attend(hidden_states, attention_mask, **kwargs)
        if residual is None:
            return self.proj(heads), attn_weights
        if heads.requires_grad or residual.requires_grad:
            return self.proj(heads) + residual, attn_weights
        if isinstance(self.proj, PrepackedLinear):
            return self.proj.forward_add(heads, residual), attn_weights
        return self.proj(heads).add_(residual), attn_weights


class InPlaceM2D2MLP(M2D2MLP):
    """An `M2D2MLP` with the exact (erf) GELU that, without autograd, applies it to `fc1`'s output in place (ATen's
    `gelu_` computes the same values as `F.gelu`), or, with prepacked Linear layers, inside `fc1`'s oneDNN kernel;
    `residual` is then added inside `fc2`'s (on a 2-core Xeon with AMX: the MLP 1.25x faster in bf16, 1.13x in
    fp32 with the same values)."""

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.fc1, PrepackedLinear) and isinstance(self.fc2, PrepackedLinear):
            hidden_states = self.fc1.forward_gelu(hidden_states)
            if residual is None:
                return self.fc2(hidden_states)
            return self.fc2.forward_add(hidden_states, residual)
        hidden_states = self.fc1(hidden_states)
        if hidden_states.requires_grad:
            hidden_states = self.activation_fn(hidden_states)
        else:
            torch.ops.aten.gelu_(hidden_states)
        hidden_states = self.fc2(hidden_states)
        return hidden_states if residual is None else hidden_states.add_(residual)


def has_exact_gelu(mlp: M2D2MLP) -> bool:
    """Whether the MLP's activation is the exact (erf) GELU that `gelu_` reproduces (not tanh or another one)."""
    return getattr(mlp.activation_fn, "act", None) is F.gelu


def use_in_place_blocks(model: nn.Module) -> nn.Module:
    """Swap the model's `M2D2Layer` / `M2D2Attention` / `M2D2MLP` (exact GELU) modules for their in-place inference
    classes, in place (parameters, hooks and checkpoints unchanged), and return the model."""
    for module in model.modules():
        if type(module) is M2D2Layer:
            module.__class__ = InPlaceM2D2Layer
        elif type(module) is M2D2Attention:
            module.__class__ = InPlaceM2D2Attention
        elif type(module) is M2D2MLP and has_exact_gelu(module):
            module.__class__ = InPlaceM2D2MLP
    return model


def optimize_for_cpu_inference(model: PreTrainedModel) -> PreTrainedModel:
    """Tune a model for CPU inference in place and return it: prepack every `nn.Linear` weight for oneDNN, swap in
    the in-place transformer blocks (`use_in_place_blocks`) and, for a bf16 model, pick the attention that is faster
    on this CPU (`bf16_attention_for_this_cpu`: eager without AMX, SDPA with it; SDPA stays for fp32), so the tuned
    model is never slower than the model as loaded.

    On a CPU without native bf16 (`cpu_has_native_bf16`: no AVX512-BF16 or AMX-BF16, e.g. AVX2 only) a bf16 model is
    cast to float32 in place, with a `UserWarning`, and tuned as an fp32 one: emulated bf16 runs slower than fp32
    there, and oneDNN cannot prepack its weights. Load the model in float32 on such CPUs to skip the warning.

    Outputs stay within the bf16 / fp32 tolerances of the untuned model (bit-identical Linear products in bf16,
    ~1e-7 relative in fp32). Training is unaffected: with autograd the layers compute `F.linear` and the blocks
    their out-of-place residuals as before.

        model = AutoModel.from_pretrained(path, dtype=torch.bfloat16)
        model = optimize_for_cpu_inference(model)
    """
    if not onednn_prepacking_available():
        raise RuntimeError(
            "optimize_for_cpu_inference needs oneDNN (torch.backends.mkldnn), which this torch build lacks; "
            "use the model as it is, or install a torch wheel built with oneDNN "
            "(the x86-64 and arm64 PyPI wheels are)."
        )
    if model.device.type != "cpu":
        raise ValueError(
            f"optimize_for_cpu_inference tunes models that run on the CPU, but this one is on {model.device}; "
            "call it after `model.to('cpu')`, or leave GPU models as they are (SDPA is already their fast path)."
        )
    if model.dtype == torch.bfloat16 and not cpu_has_native_bf16():
        warnings.warn(
            "optimize_for_cpu_inference: this CPU has no native bf16 (AVX512-BF16 or AMX-BF16), where bf16 runs "
            "emulated and slower than float32, so the model is cast to float32; load it in float32 on this CPU.",
            stacklevel=2,
        )
        model.to(torch.float32)
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PrepackedLinear
    use_in_place_blocks(model)
    if model.dtype == torch.bfloat16:
        model.set_attn_implementation(bf16_attention_for_this_cpu())
    return model
