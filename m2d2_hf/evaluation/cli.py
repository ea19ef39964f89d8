"""What the `examples/evaluate_*.py` scripts share: the common arguments, loading the set and the model, running an
evaluation into a JSON report, and printing tables.

A script builds its parser with `evaluation_parser`, adds its own arguments, and hands the evaluation function with
its own options to `run_evaluation`; what is left to it is printing the report.
"""

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModel, AutoProcessor, PreTrainedModel

from ..configuration_m2d2 import M2D2Config
from ..loading import load_feature_extractor, load_m2d2_config, pick_device
from .data import EvaluationSet, load_evaluation_set, prepare_model


def add_common_arguments(parser: argparse.ArgumentParser, split_filter: bool = True) -> None:
    """The arguments every `examples/evaluate_*.py` script takes: model, data, split, batching, device, report.
    `split_filter=False` leaves out `--split` (the linear probe uses every split)."""
    parser.add_argument("model", help="M2D2 model folder or hub id")
    parser.add_argument("data", help="folder with metadata.csv, a `datasets` folder, or a hub dataset id")
    if split_filter:
        parser.add_argument("--split", help="dataset split, or value of --split-column to keep")
    parser.add_argument("--split-column", default="split", help="column holding the split (default: split)")
    parser.add_argument(
        "--audio_column", "--audio-column", default="audio", help="audio column of a datasets source (default: audio)"
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N clips (quick runs)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per forward pass (default: 8)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--output", type=Path, help="write the JSON report here")


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """The label arguments of the classification scripts (zero-shot, linear probe)."""
    parser.add_argument(
        "--label_column", "--label-column", default="label", help="column holding the labels (default: label)"
    )
    parser.add_argument("--multi_label", "--multi-label", action="store_true", help="label lists per clip; report mAP")
    parser.add_argument(
        "--label_separator", "--label-separator", default=",", help="separator of multi-label names in a text column"
    )


def evaluation_parser(description: str, split_filter: bool = True) -> argparse.ArgumentParser:
    """A script's parser (its docstring as the description, kept as written) with the common arguments."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, split_filter)
    return parser


def evaluation_set_from_args(args: argparse.Namespace) -> EvaluationSet:
    """The evaluation set the common arguments describe."""
    return load_evaluation_set(
        args.data, getattr(args, "split", None), args.split_column, args.audio_column, args.limit
    )


def load_model_and_processor(model_path: str, device: str | None) -> tuple[PreTrainedModel, Any, torch.device]:
    """An M2D2 model folder → (model on its device in eval mode, processor or feature extractor, device)."""
    config = load_m2d2_config(model_path)
    device = pick_device(device)
    model = AutoModel.from_pretrained(model_path)
    if config.model_type == M2D2Config.model_type:
        processor = AutoProcessor.from_pretrained(model_path)
    else:
        processor = load_feature_extractor(model_path)
    prepare_model(model, device)
    return model, processor, device


def run_evaluation(args: argparse.Namespace, evaluate: Callable[..., dict], **options: Any) -> dict:
    """Loads the set and the model the common arguments name, runs `evaluate(model, processor, evaluation_set,
    batch_size=..., device=..., **options)`, and returns its report headed by the model, data (and split); the
    report is also written to `--output` when given."""
    evaluation_set = evaluation_set_from_args(args)
    model, processor, device = load_model_and_processor(args.model, args.device)
    report = evaluate(model, processor, evaluation_set, batch_size=args.batch_size, device=device, **options)
    split = {"split": args.split} if "split" in args else {}
    report = {"model": args.model, "data": args.data, **split, **report}
    if args.output:
        save_report(report, args.output)
    return report


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def save_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=_json_value) + "\n", encoding="utf-8")


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table: the first column left-aligned, the others right-aligned; floats with 4 decimals."""

    def cell(value: Any) -> str:
        return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    table = [list(header)] + [[cell(value) for value in row] for row in rows]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    lines = [
        "  ".join(
            text.ljust(width) if column == 0 else text.rjust(width)
            for column, (text, width) in enumerate(zip(line, widths))
        )
        for line in table
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


__all__ = [
    "add_common_arguments",
    "add_label_arguments",
    "evaluation_parser",
    "evaluation_set_from_args",
    "format_table",
    "load_model_and_processor",
    "run_evaluation",
    "save_report",
]
