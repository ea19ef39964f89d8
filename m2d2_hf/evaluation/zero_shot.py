"""Zero-shot classification with an M2D2 CLAP model, as the original (EVAR `zeroshot.py`; docs/method.md §7).

Each class name (underscores read as spaces) is put into a prompt ("{} can be heard" by default) and encoded alone;
each clip is embedded whole with the CLAP audio embedding; the class scores are the cosine similarities (both sides
L2-normalised, no temperature). Single-label sets report top-1 / top-5 accuracy (the original takes a softmax first,
which does not change the ranking); multi-label sets report macro mAP over the sigmoid of the cosines, as the original
(again, only the ranking matters).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from datasets import Dataset

from ..data.labels import class_names, encode_targets
from ..prompts import label_prompts
from .data import EvaluationSet, embed_audio, embed_texts, unzip_lazily
from .metrics import average_precision_per_class, mean_average_precision, per_class_accuracy, top_k_accuracy


def zero_shot_classify(
    model,
    processor,
    examples,
    labels: Sequence[str] | None = None,
    template: str | None = None,
    batch_size: int = 8,
    multi_label: bool = False,
    device: str | torch.device | None = None,
    label_column: str = "label",
    label_separator: str = ",",
    top_k: Sequence[int] = (1, 5),
    progress: bool = True,
) -> dict:
    """Classifies every clip of `examples` among `labels` and scores the result.

    Args:
        model: an `M2D2ClapModel`.
        processor: its `M2D2Processor` (feature extractor and tokenizer).
        examples: an `EvaluationSet`, a `datasets.Dataset` (targets from `label_column`), or an iterable of
            (audio, target) pairs (audio: see `data.AudioSource`).
        labels: the class names, in the order of class indices; default: the distinct targets, sorted.
        template: prompt with one `{}` for the class name (default: the model's `zero_shot_template`).
        multi_label: targets are label lists (or `label_separator`-joined names); score with mAP.
        top_k: the accuracies reported for single-label sets.

    Returns:
        A dict with `num_clips`, `labels`, `prompts`; `top{k}_accuracy` (single-label) or `mAP` (multi-label);
        `per_class` (per label: clips and top-1 accuracy, or positives and average precision; None where a class
        has no clip); `predictions`, the top-5 label names of each clip, best first; `targets` as given.
    """
    template = template or model.config.zero_shot_template
    if labels is not None:
        label_prompts(labels, template)  # a repeated label or a bad template fails before any audio is embedded
    if isinstance(examples, Dataset):
        examples = EvaluationSet.from_dataset(examples)
    if isinstance(examples, EvaluationSet):
        clips, target_values = examples.audio_sources(), examples.column(label_column)
    else:
        clips, target_values = unzip_lazily(examples)
    audio_embeds = embed_audio(model, processor, clips, "clap", batch_size, device, progress)
    labels = list(labels) if labels is not None else class_names(target_values, multi_label, label_separator)
    spoken = label_prompts(labels, template)  # underscores → spaces; rejects a template without {} or equal prompts
    prompts = [template.format(name) for name in spoken]
    text_embeds = embed_texts(model, processor, prompts, 1, device, progress)

    cosine = audio_embeds @ text_embeds.T
    targets = encode_targets(target_values, labels, multi_label, label_separator)
    ranked = torch.sort(cosine, dim=1, descending=True, stable=True).indices[:, :5].tolist()
    report: dict[str, Any] = {
        "num_clips": len(targets),
        "multi_label": multi_label,
        "template": template,
        "labels": labels,
        "prompts": prompts,
    }
    if multi_label:
        scores = torch.sigmoid(cosine).numpy()
        report["mAP"] = mean_average_precision(scores, targets)
        per_class = zip(targets.sum(0).tolist(), average_precision_per_class(scores, targets))
        report["per_class"] = {
            label: {"positives": count, "average_precision": ap} for label, (count, ap) in zip(labels, per_class)
        }
    else:
        for k in top_k:
            report[f"top{k}_accuracy"] = top_k_accuracy(cosine, targets, k)
        accuracies = per_class_accuracy(np.array(ranked)[:, 0], targets, len(labels))
        counts = np.bincount(targets, minlength=len(labels)).tolist()
        report["per_class"] = {
            label: {"clips": count, "top1_accuracy": accuracy}
            for label, count, accuracy in zip(labels, counts, accuracies)
        }
    report["predictions"] = [[labels[index] for index in row] for row in ranked]
    report["targets"] = list(target_values)
    return report


__all__ = ["zero_shot_classify"]
