"""One stage-1 training step (forward, backward, clipped AdamW, EMA, clamp) of ViT-B at batch 8 on this machine:
clips/s and achieved FLOP/s as a fraction of the matmul peak measured in the same run; fp32 and bf16 autocast.

    python benchmarks/bench_pretrain_step.py [--batch-size 8] [--repeats 5]
"""

import argparse

import torch
from common import count_flops, describe_machine, matmul_flops_per_second, median_seconds

from m2d2_hf import M2D2AudioConfig, M2D2ForPreTraining
from m2d2_hf.training.optim import weight_decay_groups


def make_step(model: M2D2ForPreTraining, batch_size: int, dtype: torch.dtype | None):
    optimizer = torch.optim.AdamW(weight_decay_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    features = torch.randn(batch_size, 80, 608)
    captions = torch.randn(batch_size, model.config.caption_embedding_size)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = model(features, captions, generator=generator).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 3.0)
        optimizer.step()
        optimizer.zero_grad()
        model.update_target(0.99995)
        model.clamp_logit_scale()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = M2D2ForPreTraining(M2D2AudioConfig(chunk_frames=608, caption_embedding_size=4096)).train()
    print(f"machine: {describe_machine()}")
    print(f"model: ViT-B stage 1 (M2D + CLAP head), batch {args.batch_size}, 80x608 crops, mask 0.7")
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        peak = matmul_flops_per_second(dtype or torch.float32)
        step = make_step(model, args.batch_size, dtype)
        flops = count_flops(step)
        seconds = median_seconds(step, repeats=args.repeats, warmup=1)
        achieved = flops / seconds
        print(
            f"{name:>14}: {seconds:6.2f} s/step, {args.batch_size / seconds:6.2f} clips/s, "
            f"{flops / 1e9:7.1f} GFLOP/step, {achieved / 1e9:6.1f} GFLOP/s = {achieved / peak:5.1%} of the "
            f"{(dtype or torch.float32)} 2048² matmul peak ({peak / 1e9:.1f} GFLOP/s, same run)"
        )


if __name__ == "__main__":
    main()
