"""ONNX export of an M2D2 model folder: `audio.onnx` (and `text.onnx` for CLAP folders) for ONNX Runtime.

The audio graph takes the normalised log-mel `input_features` [batch, 80, frames] with a dynamic batch and time axis;
the chunking of inputs longer than `chunk_frames` is inside the graph (`M2D2AudioModel`'s exportable path with a
symbolic number of frames), so any length gives what PyTorch gives. The folder also holds the feature extractor and
tokenizer files, `onnx_config.json` (what `M2D2OnnxModel` needs: the CLAP temperature, the names of the graphs) and a
README naming inputs, outputs and the parity measured against PyTorch when it was written. The output folder
appears whole or not at all (written beside it under a hidden name, then renamed), as the converter writes.

    m2d2-hf export MODEL_DIR OUT_DIR --format onnx [--quantize int8] [--overwrite]
"""

import contextlib
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoTokenizer

from .cpu_inference import cpu_has_vnni
from .feature_extraction_m2d2 import M2D2FeatureExtractor
from .loading import load_m2d2_config, load_pretrained
from .model_card import NTT_LICENCE_TEXT, OWN_WEIGHTS_TEXT, weights_derive_from_ntt
from .modeling_m2d2 import M2D2AudioModel, M2D2ClapModel
from .output_folders import check_output_dir, staged_folder
from .processing_m2d2 import M2D2Processor


ONNX_CONFIG_NAME = "onnx_config.json"
AUDIO_GRAPH, AUDIO_INT8_GRAPH, TEXT_GRAPH = "audio.onnx", "audio.int8.onnx", "text.onnx"
OPSET = 18
# Clip lengths (seconds) of the export-time parity check: one short chunk, one chunk, several chunks.
PARITY_SECONDS = (0.2, 3.0, 25.0)
QUANTIZATIONS = ("int8",)


class AudioGraph(nn.Module):
    """What `audio.onnx` computes: log-mel → (CLAP `audio_embeds`,) `pooler_output`, `frame_features`."""

    def __init__(self, model: M2D2AudioModel | M2D2ClapModel):
        super().__init__()
        self.clap = model if isinstance(model, M2D2ClapModel) else None
        self.audio_model = model.audio_model if self.clap is not None else model

    def forward(self, input_features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.audio_model(input_features)
        if self.clap is None:
            return outputs.pooler_output, outputs.frame_features
        embedding = self.clap.audio_projection(outputs.last_hidden_state, outputs.token_mask)
        return F.normalize(embedding, dim=-1), outputs.pooler_output, outputs.frame_features


class TextGraph(nn.Module):
    """What `text.onnx` computes: tokens → the L2-normalised CLAP `text_embeds`."""

    def __init__(self, model: M2D2ClapModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids, attention_mask).pooler_output


def audio_output_names(is_clap: bool) -> list[str]:
    return (["audio_embeds"] if is_clap else []) + ["pooler_output", "frame_features"]


def load_exportable_model(model_dir: str | Path) -> M2D2AudioModel | M2D2ClapModel:
    """The float32 model of an M2D2 folder (`m2d2` CLAP or `m2d2_audio` encoder), in eval mode."""
    config = load_m2d2_config(model_dir)
    model_class = M2D2ClapModel if config.model_type == "m2d2" else M2D2AudioModel
    # Eager attention: exported, it is MatMul / Softmax / MatMul, which onnxruntime runs ~15 % faster on ViT-B than the
    # SDPA export (that adds a NaN guard over every score tensor); the same function as PyTorch's, to float rounding.
    model = load_pretrained(model_class, model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def export_onnx(
    model_dir: str | Path,
    output_dir: str | Path,
    quantize: str | None = None,
    overwrite: bool = False,
    optimize: bool = True,
    reduce_range: bool | None = None,
) -> Path:
    """Exports the M2D2 folder `model_dir` to ONNX in `output_dir` and returns `output_dir`.

    Writes `audio.onnx` (input `input_features` float32 [batch, 80, frames], outputs `audio_embeds` for CLAP
    folders, `pooler_output`, `frame_features`), `text.onnx` for CLAP folders (`input_ids`, `attention_mask` int64
    [batch, tokens] → `text_embeds`), with `quantize="int8"` also `audio.int8.onnx` (onnxruntime's dynamic int8
    quantization), the feature extractor and tokenizer files, `onnx_config.json` and a README with the parity
    measured against PyTorch. A folder that holds files is refused with `FileExistsError` unless `overwrite`.

    With `optimize` (the default) the audio graph is rewritten with onnxruntime's fused CPU operators
    ([`optimize_audio_graph`]; `benchmarks/bench_onnx.py` times it against the plain graph) and the int8 graph is
    quantized from that one; `optimize=False` keeps the graph of standard ONNX operators that other runtimes load.

    `reduce_range` quantizes the int8 weights to 7 bits: without VNNI (x86 CPUs with AVX2 only) onnxruntime's u8s8
    kernels saturate on full-range weights (the demo model's int8 embeddings: cosine 0.92 to fp32, not >= 0.99).
    None (the default) chooses it for the CPU that exports (`cpu_has_vnni`); pass True for a graph that will run on
    CPUs without VNNI. `onnx_config.json` and the README record the choice.
    """
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {QUANTIZATIONS} or None, got {quantize!r}")
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite)
    model = load_exportable_model(model_dir)
    is_clap = isinstance(model, M2D2ClapModel)
    feature_extractor = load_pretrained(M2D2FeatureExtractor, model_dir, "the feature extractor")
    tokenizer = load_pretrained(AutoTokenizer, model_dir, "the tokenizer") if is_clap else None
    with staged_folder(output_dir) as staging, _exporters_quiet():
        fused_operators = _export_audio(model, staging / AUDIO_GRAPH, optimize)
        if is_clap:
            _export_text(model, tokenizer, staging / TEXT_GRAPH)
            M2D2Processor(feature_extractor, tokenizer).save_pretrained(staging)
        else:
            feature_extractor.save_pretrained(staging)
        for module in staging.glob("*.py"):  # the package's own classes load these folders: no code from files
            module.unlink()
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            if reduce_range is None:
                reduce_range = not cpu_has_vnni()
            quantize_dynamic(
                staging / AUDIO_GRAPH,
                staging / AUDIO_INT8_GRAPH,
                weight_type=QuantType.QInt8,
                reduce_range=reduce_range,
            )
        parity = measure_parity(model, feature_extractor, tokenizer, staging)
        onnx_config = {
            "model_type": model.config.model_type,
            "opset": OPSET,
            "audio_graph": AUDIO_GRAPH,
            "audio_int8_graph": AUDIO_INT8_GRAPH if quantize == "int8" else None,
            "int8_reduce_range": reduce_range if quantize == "int8" else None,
            "text_graph": TEXT_GRAPH if is_clap else None,
            "audio_outputs": audio_output_names(is_clap),
            "audio_fused_operators": fused_operators,
            "logit_scale": model.logit_scale.exp().item() if is_clap else None,
            "zero_shot_template": model.config.zero_shot_template if is_clap else None,
            "parity": parity,
        }
        (staging / ONNX_CONFIG_NAME).write_text(json.dumps(onnx_config, indent=2) + "\n")
        (staging / "README.md").write_text(_model_card(model_dir, onnx_config))
    return output_dir


@contextlib.contextmanager
def _exporters_quiet() -> Iterator[None]:
    """Keeps the exporters' notes about nothing this export does off the user's screen: torch.onnx warns, per
    graph, that torchvision's operators are not registered (the graphs use none); onnxruntime's optimizer prints
    "failed in shape inference" when its symbolic shape inference cannot type the exported graph, after which it
    fuses without it (`optimize_audio_graph` counts what it fused); its quantizer warns on the root logger about
    pre-processing and about the int64 shape tensors it leaves unquantized, as it should. Other warnings pass."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    quantizer_notes = _QuantizerNotes()
    logging.getLogger().addFilter(quantizer_notes)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        registration.setLevel(level)
        logging.getLogger().removeFilter(quantizer_notes)


class _QuantizerNotes(logging.Filter):
    """Drops the warnings onnxruntime's quantizer logs on the root logger (see `_exporters_quiet`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.WARNING and "onnxruntime" in Path(record.pathname).parts)


def _export_audio(model: M2D2AudioModel | M2D2ClapModel, path: Path, optimize: bool) -> dict[str, int]:
    """Exports the audio graph to `path` (`optimize`: for onnxruntime); returns the counts of its fused operators."""
    config = model.config.audio_config if isinstance(model, M2D2ClapModel) else model.config
    # Two chunks and a partial third: the traced graph is the general multi-chunk one.
    example = torch.randn(2, config.num_mel_bins, 2 * config.chunk_frames + config.chunk_frames // 2)
    dims = {"input_features": {0: torch.export.Dim("batch"), 2: torch.export.Dim("frames")}}
    graph = AudioGraph(model).eval()
    names = audio_output_names(isinstance(model, M2D2ClapModel))
    with torch.no_grad():
        program = torch.export.export(graph, (example,), dynamic_shapes=dims)
    torch.onnx.export(
        program,
        (example,),
        path,
        input_names=["input_features"],
        output_names=names,
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    return optimize_audio_graph(path, config.num_attention_heads, config.hidden_size) if optimize else {}


def optimize_audio_graph(path: Path, num_heads: int, hidden_size: int) -> dict[str, int]:
    """Rewrites the exported audio graph at `path` with onnxruntime's fused CPU operators; returns their counts.

    onnxruntime's transformer optimizer (basic graph optimisations, then its ViT fusions) fuses each fc1 bias with its
    GELU (`BiasGelu`). Its residual-add + LayerNorm fusion (`SkipLayerNormalization`) stays off: on the 2-core Xeon of
    `benchmarks/README.md` that kernel took 4.7 ms per call for 8 x 311 tokens where `LayerNormalization` and `Add`
    took 2.2 ms together, and the whole fp32 graph ran 3 % faster without it. It does not recognise
    the attention of this graph (one fused qkv projection viewed as [batch, tokens, 3, heads, head_size]), which
    `_fuse_attention` replaces by `MultiHeadAttention`. All are contrib operators of onnxruntime (domain
    com.microsoft): the graph is then for onnxruntime only, which is what the export targets.
    """
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    fusions = FusionOptions("vit")
    fusions.enable_skip_layer_norm = fusions.enable_bias_skip_layer_norm = False
    optimized = optimize_model(
        str(path),
        model_type="vit",
        num_heads=num_heads,
        hidden_size=hidden_size,
        opt_level=1,
        optimization_options=fusions,
        verbose=False,
    )
    fused = _fuse_attention(optimized.model, num_heads)
    counts = {name: count for name, count in optimized.get_fused_operator_statistics().items() if count}
    if fused:
        counts["MultiHeadAttention"] = fused
        if not any(opset.domain == "com.microsoft" for opset in optimized.model.opset_import):
            optimized.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    optimized.prune_graph(allow_remove_graph_inputs=False)
    optimized.save_model_to_file(str(path))
    return counts


def _fuse_attention(model, num_heads: int) -> int:
    """Replaces each exported eager attention by onnxruntime's `MultiHeadAttention`; returns how many it replaced.

    The pattern, from each Softmax back and forward: `qkv` [B, S, 3 * hidden] → Reshape [-1, S, 3, heads, head_size]
    → Slice (index 0, 1, 2 on axis 2) / Transpose / Squeeze → q, kᵀ, v; MatMul(q, kᵀ) · scale + mask → Softmax →
    MatMul(·, v) → Transpose [0, 2, 1, 3] → Reshape [B, S, hidden]. It becomes Split(qkv) → MultiHeadAttention(q, k,
    v, attention_bias=mask, scale) with the same output; attentions that differ anywhere are left as they are.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def only_consumer(name: str, op_type: str):
        found = consumers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    def head_source(name: str) -> tuple[str, int] | None:
        """(qkv tensor, index along the 3 of the view) that `name` is a Slice / Transpose / Squeeze of."""
        index = None
        node = producer.get(name)
        while node is not None and node.op_type in ("Squeeze", "Transpose", "Slice"):
            if node.op_type == "Slice":
                starts, ends, axes = (constants.get(n) for n in node.input[1:4])
                if any(v is None or v.size != 1 for v in (starts, ends, axes)) or ends.item() != starts.item() + 1:
                    return None
                if axes.item() != 2:
                    return None
                index = int(starts.item())
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Reshape" or index is None:
            return None
        shape = constants.get(node.input[1])
        if shape is None or shape.size != 5 or shape[2] != 3 or shape[3] != num_heads:
            return None
        return node.input[0], index

    replacements = {}
    for softmax in (node for node in graph.node if node.op_type == "Softmax"):
        if helper.get_attribute_value(next(iter(softmax.attribute), helper.make_attribute("axis", -1))) != -1:
            continue
        add = producer.get(softmax.input[0])
        scaled = producer.get(add.input[0]) if add is not None and add.op_type == "Add" else None
        scale = constants.get(scaled.input[1]) if scaled is not None and scaled.op_type == "Mul" else None
        scores = producer.get(scaled.input[0]) if scale is not None and scale.size == 1 else None
        weighted = only_consumer(softmax.output[0], "MatMul")
        transpose = only_consumer(weighted.output[0], "Transpose") if weighted is not None else None
        merge = only_consumer(transpose.output[0], "Reshape") if transpose is not None else None
        if scores is None or scores.op_type != "MatMul" or merge is None:
            continue
        if list(helper.get_attribute_value(transpose.attribute[0])) != [0, 2, 1, 3]:
            continue
        sources = [head_source(name) for name in (scores.input[0], scores.input[1], weighted.input[1])]
        if None in sources or len({qkv for qkv, _ in sources}) != 1 or [i for _, i in sources] != [0, 1, 2]:
            continue
        qkv = sources[0][0]
        q, k, v = (f"{qkv}_{part}" for part in "qkv")
        split = helper.make_node("Split", [qkv], [q, k, v], axis=-1, num_outputs=3, name=f"{qkv}_split")
        attention = helper.make_node(
            "MultiHeadAttention",
            [q, k, v, "", "", add.input[1]],
            [merge.output[0]],
            domain="com.microsoft",
            num_heads=num_heads,
            scale=float(scale.item()),
            name=f"{qkv}_attention",
        )
        replacements[id(merge)] = [split, attention]
    nodes = [new for node in graph.node for new in replacements.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    return len(replacements)


def _export_text(model: M2D2ClapModel, tokenizer, path: Path) -> None:
    tokens = tokenizer(["a dog barks", "rain falls on a tin roof at night"], padding=True, return_tensors="pt")
    # Any batch; any length the text tower's position table holds ([CLS] and [SEP] make at least 2 tokens).
    max_tokens = model.config.text_config.max_position_embeddings
    batch, length = torch.export.Dim("batch"), torch.export.Dim("tokens", min=2, max=max_tokens)
    dims = {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}}
    with torch.no_grad():
        program = torch.export.export(
            TextGraph(model).eval(), (tokens["input_ids"], tokens["attention_mask"]), dynamic_shapes=dims
        )
    torch.onnx.export(
        program,
        (tokens["input_ids"], tokens["attention_mask"]),
        path,
        input_names=["input_ids", "attention_mask"],
        output_names=["text_embeds"],
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        verbose=False,
    )


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the error relative to the output's scale."""
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), np.finfo(np.float32).tiny))


def measure_parity(model, feature_extractor, tokenizer, folder: Path) -> dict:
    """onnxruntime against PyTorch on synthetic clips of `PARITY_SECONDS` (and two prompts for the text graph):
    the largest relative error of each output, and the int8 graph's lowest embedding cosine to fp32."""
    import onnxruntime

    rng = np.random.default_rng(0)
    rate = feature_extractor.sampling_rate
    clips = []
    for seconds in PARITY_SECONDS:
        t = np.arange(int(seconds * rate)) / rate
        clips.append((0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.shape)).astype(np.float32))
    graph = AudioGraph(model).eval()
    names = audio_output_names(isinstance(model, M2D2ClapModel))
    session = onnxruntime.InferenceSession(folder / AUDIO_GRAPH, providers=["CPUExecutionProvider"])
    int8 = folder / AUDIO_INT8_GRAPH
    int8_session = onnxruntime.InferenceSession(int8, providers=["CPUExecutionProvider"]) if int8.exists() else None
    errors, cosines = dict.fromkeys(names, 0.0), []
    for clip in clips:
        features = feature_extractor(clip, sampling_rate=rate, return_tensors="np")["input_features"]
        with torch.no_grad():
            expected = [t.numpy() for t in graph(torch.from_numpy(features))]
        actual = session.run(names, {"input_features": features})
        for name, e, a in zip(names, expected, actual, strict=True):
            errors[name] = max(errors[name], relative_error(e, a))
        if int8_session is not None:
            quantized = int8_session.run(names[:1], {"input_features": features})[0]
            cosines.append(_cosine(actual[0], quantized))
    parity = {"clip_seconds": list(PARITY_SECONDS), "max_relative_error": errors}
    if tokenizer is not None:
        tokens = tokenizer(["a dog barks", "This is a sound of rain."], padding=True, return_tensors="np")
        text_session = onnxruntime.InferenceSession(folder / TEXT_GRAPH, providers=["CPUExecutionProvider"])
        inputs = {name: tokens[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
        with torch.no_grad():
            expected = TextGraph(model)(*(torch.from_numpy(v) for v in inputs.values())).numpy()
        errors["text_embeds"] = relative_error(expected, text_session.run(["text_embeds"], inputs)[0])
    if cosines:
        parity["int8_min_cosine"] = min(cosines)
    return parity


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())


def _model_card(model_dir: str | Path, onnx_config: dict) -> str:
    parity = onnx_config["parity"]
    is_clap = onnx_config["text_graph"] is not None
    rows = "\n".join(f"| {name} | {error:.2e} |" for name, error in parity["max_relative_error"].items())
    int8 = ""
    if "int8_min_cosine" in parity:
        weight_range = (
            "7-bit weights (`reduce_range`), for CPUs without VNNI"
            if onnx_config["int8_reduce_range"]
            else "8-bit weights, for CPUs with VNNI (AVX512-VNNI, AVX-VNNI or AMX-INT8)"
        )
        int8 = (
            f"\n`{AUDIO_INT8_GRAPH}` (dynamic int8 quantization of the weights, onnxruntime's `quantize_dynamic`, "
            f"{weight_range}): lowest cosine of its first output to the fp32 graph's on the same clips: "
            f"{parity['int8_min_cosine']:.4f}.\n"
        )
    outputs = "\n".join(
        f"- `{name}`: {what}"
        for name, what in (
            ("audio_embeds", "[batch, projection_dim] the L2-normalised CLAP audio embedding"),
            ("pooler_output", "[batch, hidden_size * frequency_patches] the clip embedding (mean of the frames)"),
            ("frame_features", "[batch, frames / 16, hidden_size * frequency_patches] one vector per 160 ms"),
        )
        if name in onnx_config["audio_outputs"]
    )
    text = (
        f"\n`{TEXT_GRAPH}`: inputs `input_ids`, `attention_mask` int64 [batch, tokens] (the tokenizer in this "
        "folder); output `text_embeds` [batch, projection_dim], L2-normalised.\n"
        if is_clap
        else ""
    )
    fused = ""
    if onnx_config["audio_fused_operators"]:
        counts = ", ".join(f"{count} {name}" for name, count in onnx_config["audio_fused_operators"].items())
        fused = f"Optimised for onnxruntime, whose fused CPU operators it uses ({counts}).\n"
    licence = NTT_LICENCE_TEXT if weights_derive_from_ntt(model_dir) else OWN_WEIGHTS_TEXT
    seconds = ", ".join(f"{s:g} s" for s in parity["clip_seconds"])
    return f"""# M2D2 — ONNX export

Exported by `m2d2-hf export` (m2d2_hf) from `{Path(model_dir).name}`, ONNX opset {onnx_config["opset"]}, for ONNX
Runtime.

## Graphs

`{AUDIO_GRAPH}`: input `input_features` float32 [batch, 80, frames], the normalised log-mel of the feature
extractor in this folder (dynamic batch and frames; clips longer than one chunk are chunked inside the graph).
{fused}Outputs:
{outputs}
{text}{int8}
## Use

```python
from m2d2_hf.onnx_runtime import M2D2OnnxModel

model = M2D2OnnxModel("path/to/this/folder")
scores = model.zero_shot(wave, ["a dog barks", "speech"], sampling_rate=16000)
```

## Parity measured at export

onnxruntime (CPU) against PyTorch float32 on synthetic clips of {seconds}: largest |difference| / largest |value|.

| output | relative error |
|---|---|
{rows}

## Licence

{licence}
"""


__all__ = ["export_onnx", "optimize_audio_graph", "AudioGraph", "TextGraph", "relative_error"]
