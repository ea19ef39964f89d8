"""Run an exported M2D2 folder (`m2d2-hf export ... --format onnx`) on ONNX Runtime: audio and text embeddings and
zero-shot classification with the package's feature extractor and the folder's tokenizer, without the PyTorch
modelling code.

    model = M2D2OnnxModel("m2d2-onnx")                  # or quantized=True for audio.int8.onnx
    model.zero_shot(wave, ["a dog barks", "speech"], sampling_rate=16000)
"""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from .feature_extraction_m2d2 import M2D2FeatureExtractor
from .onnx_export import ONNX_CONFIG_NAME
from .pipelines import check_candidate_labels, check_hypothesis_template
from .prompts import DEFAULT_TEMPLATE


class M2D2OnnxModel:
    """An exported M2D2 folder on onnxruntime.

    Args:
        folder: the output folder of [`export_onnx`].
        quantized: run `audio.int8.onnx` (exported with `--quantize int8`) instead of `audio.onnx`.
        providers: onnxruntime execution providers (default: CPU).
        session_options: an `onnxruntime.SessionOptions` (threads, graph optimisation level).
    """

    def __init__(
        self,
        folder: str | Path,
        quantized: bool = False,
        providers: Sequence[str] | None = None,
        session_options=None,
    ):
        import onnxruntime

        folder = Path(folder)
        config_path = folder / ONNX_CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(
                f"{folder} has no {ONNX_CONFIG_NAME}: give a folder written by `m2d2-hf export MODEL_DIR OUT_DIR "
                "--format onnx`"
            )
        self.config = json.loads(config_path.read_text())
        audio_graph = self.config["audio_int8_graph"] if quantized else self.config["audio_graph"]
        if audio_graph is None:
            raise FileNotFoundError(f"{folder} has no int8 audio graph: export it with --quantize int8")
        providers = list(providers or ["CPUExecutionProvider"])

        def session(name: str):
            return onnxruntime.InferenceSession(folder / name, sess_options=session_options, providers=providers)

        self.audio_session = session(audio_graph)
        self.audio_outputs = list(self.config["audio_outputs"])
        self.feature_extractor = M2D2FeatureExtractor.from_pretrained(folder)
        self.is_clap = self.config["text_graph"] is not None
        self.text_session = session(self.config["text_graph"]) if self.is_clap else None
        self.tokenizer = AutoTokenizer.from_pretrained(folder) if self.is_clap else None

    @property
    def sampling_rate(self) -> int:
        return self.feature_extractor.sampling_rate

    def audio_outputs_of(self, audio: np.ndarray, sampling_rate: int | None = None) -> dict[str, np.ndarray]:
        """All outputs of the audio graph for one 1-D waveform: name → [1, ...] array."""
        features = self.feature_extractor(
            audio, sampling_rate=sampling_rate or self.sampling_rate, return_tensors="np"
        )["input_features"].astype(np.float32)
        return dict(zip(self.audio_outputs, self.audio_session.run(self.audio_outputs, {"input_features": features})))

    def embed_audio(
        self, audio: np.ndarray | Sequence[np.ndarray], sampling_rate: int | None = None, output: str | None = None
    ) -> np.ndarray:
        """[clips, D] embeddings of one waveform or a list of them (any lengths; each clip is encoded from its own
        frames). `output`: "audio_embeds" (the CLAP embedding; the default for CLAP folders) or "pooler_output"
        (the encoder's clip embedding; the default for encoder folders)."""
        output = output or self.audio_outputs[0]
        if output not in self.audio_outputs or output == "frame_features":
            raise ValueError(f"output must be one of {self.audio_outputs[:-1]}, got {output!r}")
        clips = [audio] if isinstance(audio, np.ndarray) and audio.ndim == 1 else list(audio)
        return np.concatenate([self.audio_outputs_of(clip, sampling_rate)[output] for clip in clips])

    def embed_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """[texts, D] L2-normalised CLAP text embeddings."""
        if not self.is_clap:
            raise ValueError("this export holds an audio encoder only: text embeddings need a CLAP (m2d2) folder")
        tokens = self.tokenizer([texts] if isinstance(texts, str) else list(texts), padding=True, return_tensors="np")
        inputs = {name: tokens[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
        return self.text_session.run(["text_embeds"], inputs)[0]

    def zero_shot(
        self,
        audio: np.ndarray | Sequence[np.ndarray],
        candidate_labels: str | Sequence[str],
        sampling_rate: int | None = None,
        hypothesis_template: str | None = None,
    ) -> list[dict] | list[list[dict]]:
        """Zero-shot classification as the zero-shot-audio-classification pipeline does it (same prompts, by default
        the exported model's `zero_shot_template`; softmax over the scaled cosine similarities):
        `[{"score", "label"}, ...]` best first, one list per clip when given a list of clips."""
        # Exports made before the template was recorded prompt with M2D2Config's default, as the pipeline does.
        hypothesis_template = hypothesis_template or self.config.get("zero_shot_template") or DEFAULT_TEMPLATE
        labels = check_candidate_labels(candidate_labels)
        check_hypothesis_template(hypothesis_template)
        single = isinstance(audio, np.ndarray) and audio.ndim == 1
        audio_embeds = self.embed_audio(audio, sampling_rate, output="audio_embeds")
        text_embeds = self.embed_text([hypothesis_template.format(label) for label in labels])
        logits = audio_embeds @ text_embeds.T * self.config["logit_scale"]
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        results = [
            [{"score": float(row[i]), "label": labels[i]} for i in np.argsort(-row, kind="stable")] for row in scores
        ]
        return results[0] if single else results


__all__ = ["M2D2OnnxModel"]
