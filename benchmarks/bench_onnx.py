"""ONNX Runtime against PyTorch on 8 x 10 s clips with the ViT-B M2D2 encoder (random weights in the released
layout): onnxruntime fp32 / PyTorch fp32 and onnxruntime int8 (dynamic quantization) / PyTorch fp32 speed ratios,
timed round-robin in one run, and the int8 graph's cosine to the fp32 clip embeddings.

    python benchmarks/bench_onnx.py [--repeats 3] [--clips 8] [--seconds 10]

The export goes through `m2d2_hf.onnx_export.export_onnx` (the `m2d2-hf export` command), so its parity check runs
too. onnxruntime gets as many intra-op threads as torch uses.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from common import describe_machine, interleaved_seconds

from m2d2_hf import M2D2AudioConfig, M2D2AudioModel, M2D2FeatureExtractor
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"machine: {describe_machine()}; int8 matrix extensions: {int8_extensions()}")
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(int(16000 * args.seconds)).astype(np.float32) * 0.1 for _ in range(args.clips)]
    feature_extractor = M2D2FeatureExtractor()
    features = feature_extractor(clips, sampling_rate=16000, return_tensors="np")["input_features"]
    model = M2D2AudioModel(M2D2AudioConfig()).eval()

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "model")
        feature_extractor.save_pretrained(Path(tmp) / "model")
        folder = export_onnx(Path(tmp) / "model", Path(tmp) / "onnx", quantize="int8")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        sessions = {
            name: onnxruntime.InferenceSession(folder / graph, options, providers=["CPUExecutionProvider"])
            for name, graph in (("fp32", AUDIO_GRAPH), ("int8", AUDIO_INT8_GRAPH))
        }
        inputs = {"input_features": features}
        torch_features = torch.from_numpy(features)
        with torch.inference_mode():
            times = interleaved_seconds(
                {
                    "PyTorch fp32": lambda: model(torch_features),
                    "onnxruntime fp32": lambda: sessions["fp32"].run(["pooler_output"], inputs),
                    "onnxruntime int8": lambda: sessions["int8"].run(["pooler_output"], inputs),
                },
                repeats=args.repeats,
            )
            reference = model(torch_features).pooler_output.double().numpy()
    fp32 = sessions["fp32"].run(["pooler_output"], inputs)[0].astype(np.float64)
    int8 = sessions["int8"].run(["pooler_output"], inputs)[0].astype(np.float64)
    cosine = (fp32 * int8).sum(-1) / np.linalg.norm(fp32, axis=-1) / np.linalg.norm(int8, axis=-1)
    relative = np.abs(fp32 - reference).max() / np.abs(reference).max()

    print(f"{args.clips} x {args.seconds:g} s, ViT-B (random weights), median of {args.repeats} interleaved rounds")
    for name, seconds in times.items():
        print(f"  {name:18s} {seconds:7.3f} s")
    print(
        f"onnxruntime fp32 / PyTorch fp32 speed: {times['PyTorch fp32'] / times['onnxruntime fp32']:.2f}x "
        "(target >= 1.0x)"
    )
    print(
        f"onnxruntime int8 / PyTorch fp32 speed: {times['PyTorch fp32'] / times['onnxruntime int8']:.2f}x "
        "(target >= 2x on CPUs with VNNI / AMX)"
    )
    print(
        f"int8 clip-embedding cosine to fp32: min {cosine.min():.4f} (target >= 0.99); "
        f"fp32 onnxruntime vs PyTorch relative error {relative:.1e}"
    )


if __name__ == "__main__":
    main()
