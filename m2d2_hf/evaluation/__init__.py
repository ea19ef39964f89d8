"""Evaluation suite of M2D2 models, following the original evaluations (EVAR; docs/method.md §7).

* `zero_shot_classify`: zero-shot classification with a CLAP model (top-1/top-5 accuracy, or mAP if multi-label).
* `evaluate_retrieval`: audio↔text retrieval (R@1/5/10, mAP@10, both directions).
* `evaluate_linear_probe` / `linear_probe`: linear evaluation of frozen clip embeddings (accuracy or mAP).
* `load_evaluation_set`: an audiofolder-style folder with metadata.csv, or a `datasets` dataset / hub id.
* `metrics`: the metrics on their own (score or similarity matrices in, numbers out).
* `metric_module_path`: the same metrics as `evaluate` modules that load offline from the package
  (`evaluate.load(metric_module_path("top_k_accuracy"))`).

The `examples/evaluate_*.py` scripts wrap these and write JSON reports.
"""

from ..extras import require_extra


# ruff: noqa: E402 -- the imports below follow the extras check, so that a missing package names the extra
require_extra("eval")

from .data import EvaluationSet, embed_audio, embed_texts, load_evaluation_set
from .linear_probe import evaluate_linear_probe, linear_probe
from .metric_modules import METRIC_MODULES, metric_module_path
from .metrics import (
    audio_to_text_metrics,
    mean_average_precision,
    retrieval_metrics,
    text_to_audio_metrics,
    top_k_accuracy,
)
from .retrieval import evaluate_retrieval
from .zero_shot import zero_shot_classify


__all__ = [
    "EvaluationSet",
    "METRIC_MODULES",
    "audio_to_text_metrics",
    "embed_audio",
    "embed_texts",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "linear_probe",
    "load_evaluation_set",
    "mean_average_precision",
    "metric_module_path",
    "retrieval_metrics",
    "text_to_audio_metrics",
    "top_k_accuracy",
    "zero_shot_classify",
]
