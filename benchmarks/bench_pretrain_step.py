"""One stage-1 training step (forward, backward, clipped AdamW, EMA, clamp) of ViT-B at batch 8 on this machine:
clips/s and achieved FLOP/s as a fraction of the matmul peak measured in the same run (the best `torch.mm` rate over
the step's own GEMM shapes, output preallocated), fp32 and bf16 autocast timed round-robin, and a profile of one bf16
step grouped by phase and by kind of operation.

    python benchmarks/bench_pretrain_step.py [--batch-size 8] [--repeats 5] [--no-profile] [--default-malloc]

Like the training programs on the CPU, it first makes glibc keep freed memory mapped (`m2d2_hf.host_memory`);
`--default-malloc` leaves glibc's defaults, to measure what that setting is worth (page faults per step printed).
"""

import argparse
import copy
import re

import torch
from common import (
    count_flops,
    describe_machine,
    gemm_peak_contenders,
    gemm_shapes,
    interleaved_seconds,
    load_average,
    page_faults,
)
from torch.profiler import ProfilerActivity, profile, record_function

from m2d2_hf import M2D2AudioConfig, M2D2ForPreTraining
from m2d2_hf.host_memory import keep_freed_memory_mapped
from m2d2_hf.training.optim import adamw, clip_grad_norm_, weight_decay_groups
from m2d2_hf.training.stage1 import training_attention


PHASES = ("forward", "backward", "clip", "optimizer", "ema")
# Kinds of ATen operation, by name (first match wins); the rest is "other elementwise".
KINDS = (
    ("GEMM (mm, addmm, bmm)", r"^aten::(mm|addmm|bmm|baddbmm|addbmm)$"),
    ("attention kernel", r"scaled_dot_product|_softmax"),
    ("dtype casts and copies", r"^aten::(copy_|_to_copy|clone|contiguous)$"),
    ("LayerNorm", r"layer_norm"),
    ("GELU", r"gelu"),
    ("concatenation, fill", r"^aten::(cat|stack|fill_|zero_|zeros)$"),
    ("reductions", r"^aten::(sum|linalg_vector_norm|norm|mean)$"),
)


def make_step(model: M2D2ForPreTraining, batch_size: int, dtype: torch.dtype | None):
    """The recipe's step as `examples/pretrain_stage1.py` runs it on the CPU, each phase labelled for the profiler."""
    optimizer = adamw(weight_decay_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    features = torch.randn(batch_size, 80, 608)
    captions = torch.randn(batch_size, model.config.caption_embedding_size)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with record_function("forward"), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(features, captions, generator=generator).loss
        with record_function("backward"):
            loss.backward()
        with record_function("clip"):
            clip_grad_norm_(model.parameters(), 3.0)
        with record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad()
        with record_function("ema"):
            model.update_target(0.99995)
            model.clamp_logit_scale()

    return step


def print_profile(step, name: str) -> None:
    """Self CPU time of one step by phase and by kind of operation (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    phases = {e.key: e.cpu_time_total for e in events if e.key in PHASES}
    print(f"profile of one {name} step ({load_average()}), {total / 1e6:.2f} s of self CPU time:")
    print("  by phase: " + ", ".join(f"{p} {phases.get(p, 0) / total:.1%}" for p in PHASES))
    kinds: dict[str, float] = {}
    for event in events:
        if event.key in PHASES:
            continue
        kind = next((k for k, pattern in KINDS if re.search(pattern, event.key)), "other elementwise")
        kinds[kind] = kinds.get(kind, 0.0) + event.self_cpu_time_total
    print("  by kind:  " + ", ".join(f"{k} {t / total:.1%}" for k, t in sorted(kinds.items(), key=lambda kv: -kv[1])))
    top = sorted((e for e in events if e.key not in PHASES), key=lambda e: -e.self_cpu_time_total)[:8]
    print("  top ops:  " + ", ".join(f"{e.key} {e.self_cpu_time_total / total:.1%} ({e.count})" for e in top))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of one bf16 step")
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc malloc's settings as they are")
    args = parser.parse_args()

    heap = "glibc defaults" if args.default_malloc or not keep_freed_memory_mapped() else "freed memory kept mapped"

    torch.manual_seed(0)
    model = M2D2ForPreTraining(M2D2AudioConfig(chunk_frames=608, caption_embedding_size=4096)).train()
    print(f"machine: {describe_machine()}, malloc: {heap}")
    print(f"model: ViT-B stage 1 (M2D + CLAP head), batch {args.batch_size}, 80x608 crops, mask 0.7")
    dtypes = {"fp32": torch.float32, "bf16 autocast": torch.bfloat16}
    # Each step on its own copy of the model with the attention kernel the program picks for it.
    models = {"fp32": model, "bf16 autocast": copy.deepcopy(model)}
    for name, mixed_precision in (("fp32", "no"), ("bf16 autocast", "bf16")):
        models[name].set_attn_implementation(training_attention(torch.device("cpu"), mixed_precision))
    print(
        "attention kernel (m2d2_hf.training.stage1.training_attention): "
        + ", ".join(f"{name} {models[name].config._attn_implementation}" for name in dtypes)
    )
    steps = {
        name: make_step(models[name], args.batch_size, None if d == torch.float32 else d) for name, d in dtypes.items()
    }
    flops = {name: count_flops(step) for name, step in steps.items()}
    peaks = {}
    for name, step in steps.items():
        peaks.update(gemm_peak_contenders(gemm_shapes(step), dtypes[name]))
    seconds = interleaved_seconds({**steps, **{name: fn for name, (fn, _) in peaks.items()}}, repeats=args.repeats)
    print(f"timed round-robin, median of {args.repeats}; {load_average()} at the end")
    for name, dtype in dtypes.items():
        label = "fp32" if dtype == torch.float32 else "bf16"
        rates = {p: f / seconds[p] for p, (_, f) in peaks.items() if p.startswith(label)}
        best = max(rates, key=rates.get)
        achieved = flops[name] / seconds[name]
        print(
            f"{name:>14}: {seconds[name]:6.2f} s/step, {args.batch_size / seconds[name]:6.2f} clips/s, "
            f"{flops[name] / 1e9:7.1f} GFLOP/step, {achieved / 1e9:6.1f} GFLOP/s = {achieved / rates[best]:5.1%} of "
            f"the {label} matmul peak ({rates[best] / 1e9:.1f} GFLOP/s, best torch.mm over the step's own shapes: "
            f"{best.split(' peak ')[1]}, same run)"
        )
    print(
        f"bf16 autocast vs fp32: {seconds['fp32'] / seconds['bf16 autocast']:.2f}x (target: >= 35% of the bf16 peak "
        "on AMX)"
    )
    faults = ", ".join(f"{name} {page_faults(step)}" for name, step in steps.items())
    print(f"page faults in one more step ({heap}): {faults}")
    if not args.no_profile:
        print_profile(steps["bf16 autocast"], "bf16 autocast")


if __name__ == "__main__":
    main()
