"""ONNX Runtime against PyTorch on 8 x 10 s clips with the ViT-B M2D2 encoder (random weights in the released
layout): onnxruntime fp32 / PyTorch fp32 and onnxruntime int8 (dynamic quantization) / PyTorch fp32 speed ratios,
timed round-robin in one run, and the int8 graph's cosine to the fp32 clip embeddings; each graph as exported by
default (optimised: onnxruntime's fused BiasGelu and MultiHeadAttention) and as exported with
`optimize=False` (standard ONNX operators only), to show what the optimisation gains.

    python benchmarks/bench_onnx.py [--repeats 3] [--clips 8] [--seconds 10] [--default-malloc]

The export goes through `m2d2_hf.onnx_export.export_onnx` (the `m2d2-hf export` command), so its parity check runs
too. onnxruntime gets as many intra-op threads as torch uses. PyTorch is timed with freed memory kept mapped
(`m2d2_hf.host_memory`): under glibc's defaults each onnxruntime run between two PyTorch forwards left the heap
trimmed, and the next forward took 84 000 fresh pages and ran 1.3x slower (1.70 vs 1.27 s), which flattered
onnxruntime; `--default-malloc` shows that (page faults per PyTorch forward printed). Each timed call follows an
untimed one of the same contender (`primed`): right after onnxruntime's plain graphs PyTorch ran 1.6–2.3 s instead of
1.25–1.30 s, as their working sets evict each other's from the caches.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import describe_machine, gemm_shapes, interleaved_seconds, mm_fn, page_faults

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2FeatureExtractor
from m2d2_hf.host_memory import keep_freed_memory_mapped
from m2d2_hf.onnx_export import AUDIO_GRAPH, AUDIO_INT8_GRAPH, export_onnx


def int8_extensions() -> str:
    """The CPU's int8 matrix instructions (what dynamic int8 quantization needs to beat fp32)."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    found = [flag for flag in ("avx512_vnni", "avx_vnni", "amx_int8") if flag in flags]
    return ", ".join(found) or "none (no VNNI / AMX)"


def onnxruntime_matmul_fn(m: int, k: int, n: int, threads: int, min_flops: float = 4e9):
    """onnxruntime's fp32 `MatMul` (MLAS, its weight a constant that the session prepacks, as in `audio.onnx`) of an
    [m, k] input by a [k, n] weight, repeated to about `min_flops`, and its FLOPs: the GEMM every fp32 graph runs."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((k, n), dtype=np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [weight],
    )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # Sleeping, not spinning, between calls, as in `main`.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = {"x": np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)}
    inner = max(1, int(np.ceil(min_flops / (2 * m * k * n))))

    def run() -> None:
        for _ in range(inner):
            session.run(None, inputs)

    return run, 2 * m * k * n * inner


def gemm_ceiling(model: M2D2AudioModel, features: torch.Tensor, repeats: int) -> tuple[float, dict[str, float]]:
    """How fast onnxruntime's fp32 GEMMs can make the encoder relative to torch's: each of the encoder's Linear
    shapes timed through MLAS and through `torch.mm` (preallocated output) round-robin, the per-shape rate ratios
    (MLAS / torch), and their FLOP-weighted combination, the time the encoder's GEMMs take in torch over the time they
    take in onnxruntime. No fp32 graph can beat PyTorch by more than that on GEMM-bound work."""
    with torch.inference_mode():
        shapes = gemm_shapes(lambda: model(features))
    contenders, weights = {}, {}
    for (m, k, n, dtype), count in shapes.items():
        if dtype == torch.float32:
            weights[(m, k, n)] = 2 * m * k * n * count
            contenders[("torch", m, k, n)] = mm_fn(m, k, n, dtype)
            contenders[("onnxruntime", m, k, n)] = onnxruntime_matmul_fn(m, k, n, torch.get_num_threads())
    seconds = interleaved_seconds({key: fn for key, (fn, _) in contenders.items()}, repeats=repeats)
    rate = {key: contenders[key][1] / seconds[key] for key in contenders}
    ratios = {f"{m}x{k}x{n}": rate[("onnxruntime", m, k, n)] / rate[("torch", m, k, n)] for (m, k, n) in weights}
    torch_time = sum(flops / rate[("torch", *shape)] for shape, flops in weights.items())
    onnxruntime_time = sum(flops / rate[("onnxruntime", *shape)] for shape, flops in weights.items())
    return torch_time / onnxruntime_time, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--default-malloc", action="store_true", help="leave glibc malloc's settings as they are")
    args = parser.parse_args()
    heap = "glibc defaults" if args.default_malloc or not keep_freed_memory_mapped() else "freed memory kept mapped"
    torch.manual_seed(0)
    print(f"machine: {describe_machine()}; int8 matrix extensions: {int8_extensions()}; malloc: {heap}")
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(int(16000 * args.seconds)).astype(np.float32) * 0.1 for _ in range(args.clips)]
    feature_extractor = M2D2FeatureExtractor()
    features = feature_extractor(clips, sampling_rate=16000, return_tensors="np")["input_features"]
    model = M2D2AudioModel(M2D2AudioConfig()).eval()

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        feature_extractor.save_pretrained(Path(tmp) / "model")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # Intra-op threads that sleep instead of spinning after a run: spinning ones took the cores from the contender
        # timed next (torch.mm measured 10 % slower after them, 20 ms later), and sleeping costs onnxruntime nothing
        # measurable here (1.770 vs 1.760 s for the fp32 graph).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = {}
        for kind, optimize in (("optimised", True), ("plain", False)):
            folder = export_onnx(Path(tmp) / "model", Path(tmp) / kind, quantize="int8", optimize=optimize)
            for precision, graph in (("fp32", AUDIO_GRAPH), ("int8", AUDIO_INT8_GRAPH)):
                sessions[f"onnxruntime {precision} {kind}"] = onnxruntime.InferenceSession(
                    folder / graph, options, providers=["CPUExecutionProvider"]
                )
        inputs = {"input_features": features}
        torch_features = torch.from_numpy(features)
        contenders = {"PyTorch fp32": lambda: model(torch_features)}
        for name, session in sessions.items():
            contenders[name] = lambda session=session: session.run(["pooler_output"], inputs)
        with torch.inference_mode():
            times = interleaved_seconds(contenders, repeats=args.repeats, primed=True)
            reference = model(torch_features).pooler_output.double().numpy()
            sessions["onnxruntime fp32 optimised"].run(["pooler_output"], inputs)
            faults = page_faults(lambda: model(torch_features))
    outputs = {
        name: session.run(["pooler_output"], inputs)[0].astype(np.float64) for name, session in sessions.items()
    }

    print(
        f"{args.clips} x {args.seconds:g} s, ViT-B (random weights), median of {args.repeats} interleaved rounds, "
        "each timed call right after an untimed one of the same contender"
    )
    print(f"page faults of one PyTorch forward right after an onnxruntime run ({heap}): {faults}")
    for name, seconds in times.items():
        print(f"  {name:40s} {seconds:7.3f} s")
    for kind in ("optimised", "plain"):
        fp32, int8 = outputs[f"onnxruntime fp32 {kind}"], outputs[f"onnxruntime int8 {kind}"]
        cosine = (fp32 * int8).sum(-1) / np.linalg.norm(fp32, axis=-1) / np.linalg.norm(int8, axis=-1)
        relative = np.abs(fp32 - reference).max() / np.abs(reference).max()
        print(
            f"{kind} graphs: onnxruntime fp32 / PyTorch fp32 speed "
            f"{times['PyTorch fp32'] / times[f'onnxruntime fp32 {kind}']:.2f}x (target >= 1.0x); "
            f"int8 / PyTorch fp32 {times['PyTorch fp32'] / times[f'onnxruntime int8 {kind}']:.2f}x "
            f"(target >= 2x on CPUs with VNNI / AMX); int8 clip-embedding cosine to fp32 min {cosine.min():.4f} "
            f"(target >= 0.99); fp32 vs PyTorch relative error {relative:.1e}"
        )
    ceiling, ratios = gemm_ceiling(model, torch_features, args.repeats)
    print(
        "GEMM ceiling (same run, the encoder's Linear shapes): onnxruntime's MLAS fp32 MatMul runs at "
        + ", ".join(f"{shape} {ratio:.2f}x" for shape, ratio in ratios.items())
        + f" torch.mm's rate; FLOP-weighted, the encoder's GEMMs take {ceiling:.2f}x torch's speed in onnxruntime, "
        "the most any fp32 graph of it can reach on GEMM-bound work"
    )
    print(
        "optimised / plain speed: fp32 "
        f"{times['onnxruntime fp32 plain'] / times['onnxruntime fp32 optimised']:.2f}x, int8 "
        f"{times['onnxruntime int8 plain'] / times['onnxruntime int8 optimised']:.2f}x"
    )


if __name__ == "__main__":
    main()
