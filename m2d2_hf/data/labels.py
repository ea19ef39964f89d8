"""Labels: a row's label cell → label names → class targets, for fine-tuning, the evaluations and the command line.

A cell is a label name, a class index, a list (or array) of those, or a string of names joined by a separator
(`"dog,bark"`, AudioSet's and FSD50K's CSVs); None is no label.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def split_labels(cell: Any, separator: str | None = ",") -> list:
    """The labels of one cell: a list's non-None items, a string's `separator`-joined names (stripped, empty ones
    dropped; the whole string with `separator=None`), or the cell itself; None gives none."""
    if cell is None:
        return []
    if hasattr(cell, "tolist") and not isinstance(cell, str):
        cell = cell.tolist()
    if isinstance(cell, (list, tuple)):
        return [value for value in cell if value is not None]
    if isinstance(cell, str):
        names = cell.split(separator) if separator is not None else [cell]
        return [name.strip() for name in names if name.strip()]
    return [cell]


class LabelReader:
    """The label names of one row's label cell (picklable: DataLoader workers get it through the row filter)."""

    def __init__(self, column: str, multi_label: bool, separator: str | None):
        self.column, self.multi_label, self.separator = column, multi_label, separator

    def names(self, cell: Any) -> list[str]:
        """The cell's names as strings.

        Raises:
            ValueError: several names in a single-label reader.
        """
        values = [str(value).strip() for value in split_labels(cell, self.separator)]
        values = [value for value in values if value]
        if not self.multi_label and len(values) > 1:
            raise ValueError(
                f"column {self.column!r} holds several labels {values} in a single-label run: pass --multi_label"
            )
        return values


def class_names(values: Sequence[Any], multi_label: bool = False, separator: str = ",") -> list[str]:
    """The sorted distinct labels of a label column (names, or label lists when `multi_label`)."""
    names = {name for value in values for name in (split_labels(value, separator) if multi_label else [value])}
    return sorted(str(name) for name in names)


def encode_targets(
    values: Sequence[Any], labels: Sequence[str], multi_label: bool = False, separator: str = ","
) -> np.ndarray:
    """Label values → class indices [N] (single-label) or multi-hot [N, C] int64 (multi-label). A value is a label
    name or a class index; multi-label values are lists of those or `separator`-joined names.

    Raises:
        ValueError: a value that is neither one of `labels` nor a class index.
    """
    lookup = {label: index for index, label in enumerate(labels)}

    def index_of(value: Any) -> int:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and 0 <= value < len(labels):
            return int(value)
        if value in lookup:
            return lookup[value]
        raise ValueError(f"label {value!r} is not one of the {len(labels)} classes {list(labels)[:20]}")

    if not multi_label:
        return np.array([index_of(value) for value in values], dtype=np.int64)
    targets = np.zeros((len(values), len(labels)), dtype=np.int64)
    for row, value in enumerate(values):
        targets[row, [index_of(name) for name in split_labels(value, separator)]] = 1
    return targets


def targets_of(cells: list, reader: LabelReader, label2id: dict[str, int]) -> torch.Tensor:
    """[B, C] float targets of a training batch: one-hot (single-label) or multi-hot; names outside the label set
    are ignored (the row filter already left out rows with none of them)."""
    targets = torch.zeros(len(cells), len(label2id))
    for row, cell in enumerate(cells):
        for name in reader.names(cell):
            if name in label2id:
                targets[row, label2id[name]] = 1.0
    return targets


def parse_label_list(text: str, separator: str = ",") -> list[str]:
    """Class names given as text (`--labels a,b,c`, or a labels file with `separator="\\n"`), stripped, empty ones
    dropped.

    Raises:
        ValueError: a name given twice (its class would be ambiguous).
    """
    labels = split_labels(text, separator)
    check_unique_labels(labels)
    return labels


def check_unique_labels(labels: Sequence[str]) -> None:
    """Raises `ValueError` when a class name is given more than once: its class would be ambiguous, and a zero-shot
    softmax would split its probability between the copies (0.5 and 0.5 where 1.0 is meant)."""
    repeated = sorted(label for label, count in Counter(labels).items() if count > 1)
    if repeated:
        raise ValueError(f"the labels repeat {repeated}: give each class once")


__all__ = [
    "LabelReader",
    "check_unique_labels",
    "class_names",
    "encode_targets",
    "parse_label_list",
    "split_labels",
    "targets_of",
]
