"""Linear evaluation of frozen clip embeddings, as the original (EVAR `2pass_lineareval.py`; docs/method.md §7).

Embeddings are computed once; then, per seed (42, 43, 44 by default) and per fold, a `StandardScaler` is fit on the
training clips and a single `Linear` layer is trained on the standardised embeddings: Adam (lr 3e-5, weight decay
1e-8), batches of 200, at most 200 epochs, early stopping with patience 20 on the validation accuracy (mAP when
multi-label; a tie counts as an improvement), the best epoch's weights restored. Loss: −mean(onehot · log_softmax),
i.e. the cross-entropy divided by the number of classes (as the original; with Adam it matters through the weight
decay and eps only), or binary cross-entropy on the logits when multi-label. The score is the test accuracy (or mAP),
averaged over folds, then over seeds.

Not fixed by the spec, chosen here: the layer starts from torch's default `nn.Linear` initialisation; without a
validation split, the validation clips are a stratified `valid_fraction` (0.1) of the training clips, redrawn per
seed.
"""

import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.preprocessing import StandardScaler
from torch import nn

from ..data.labels import class_names, encode_targets
from .data import VALID_SPLITS, EvaluationSet, embed_audio
from .metrics import mean_average_precision, top_k_accuracy


SEEDS = (42, 43, 44)


def _score(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> float:
    """Accuracy (single-label) or macro mAP (multi-label; the logits rank like their sigmoid)."""
    if multi_label:
        return mean_average_precision(logits.cpu().numpy(), targets.cpu().numpy())
    return top_k_accuracy(logits.cpu(), targets.cpu(), 1)


def _loss(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits, targets.float())
    return -(F.one_hot(targets, logits.shape[1]) * logits.log_softmax(-1)).mean()


def train_linear_classifier(
    train_x: np.ndarray,
    train_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    num_classes: int,
    multi_label: bool = False,
    seed: int = 42,
    lr: float = 3e-5,
    weight_decay: float = 1e-8,
    batch_size: int = 200,
    max_epochs: int = 200,
    patience: int = 20,
    device: str | torch.device | None = None,
) -> tuple[StandardScaler, nn.Linear, dict[str, Any]]:
    """Fits the scaler on `train_x` and trains the linear layer with early stopping on (`valid_x`, `valid_y`).

    Targets are class indices [N], or multi-hot [N, C] when `multi_label`.

    Returns:
        The fitted scaler, the layer holding the best epoch's weights (on `device`), and a dict with `best_epoch`
        (1-based), `epochs` run and `valid_score` at the best epoch.
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scaler = StandardScaler().fit(train_x)

    def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.as_tensor(scaler.transform(x), dtype=torch.float32, device=device),
            torch.as_tensor(y, dtype=torch.long, device=device),
        )

    (x, y), (vx, vy) = tensors(train_x, train_y), tensors(valid_x, valid_y)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        layer = nn.Linear(x.shape[1], num_classes).to(device)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=weight_decay)
    shuffle = torch.Generator().manual_seed(seed)

    best_score, best_epoch, best_state, waited = -np.inf, 0, None, 0
    for epoch in range(1, max_epochs + 1):
        layer.train()
        for batch in torch.randperm(len(x), generator=shuffle).split(batch_size):
            batch = batch.to(device)
            optimizer.zero_grad()
            _loss(layer(x[batch]), y[batch], multi_label).backward()
            optimizer.step()
        layer.eval()
        with torch.no_grad():
            score = _score(layer(vx), vy, multi_label)
        if score >= best_score:  # ties count as improvement: the latest of equal epochs is kept
            best_score, best_epoch, waited = score, epoch, 0
            best_state = {name: value.clone() for name, value in layer.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    layer.load_state_dict(best_state)
    return scaler, layer, {"best_epoch": best_epoch, "epochs": epoch, "valid_score": best_score}


def holdout(
    targets: np.ndarray, fraction: float, seed: int, multi_label: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Splits positions 0..N-1 into (train, valid), `fraction` of them for validation, stratified by class for
    single-label targets (each class keeps at least one training clip). Multi-label targets are split at random."""
    rng = np.random.default_rng(seed)
    if multi_label:
        order = rng.permutation(len(targets))
        count = max(1, round(fraction * len(targets)))
        return np.sort(order[count:]), np.sort(order[:count])
    valid = []
    for label in np.unique(targets):
        members = rng.permutation(np.flatnonzero(targets == label))
        valid.extend(members[: min(round(fraction * len(members)), len(members) - 1)])
    if not valid:
        raise ValueError(
            f"a validation fraction of {fraction} leaves no validation clip: give a validation split or a larger "
            "fraction"
        )
    valid = np.sort(np.array(valid))
    return np.setdiff1d(np.arange(len(targets)), valid), valid


_TRAINING_OPTIONS = ("lr", "weight_decay", "batch_size", "max_epochs", "patience")


def _training_settings(options: dict[str, Any]) -> dict[str, Any]:
    """`train_linear_classifier`'s training options, its defaults filled in for those not in `options` (the report
    states them all); any other option raises a TypeError."""
    unknown = sorted(set(options) - set(_TRAINING_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected training options {unknown}; expected some of {_TRAINING_OPTIONS}")
    parameters = inspect.signature(train_linear_classifier).parameters
    return {name: options.get(name, parameters[name].default) for name in _TRAINING_OPTIONS}


def _experiments(
    split: Sequence[str] | None, folds: Sequence[Any] | None, count: int
) -> list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]]:
    """(name, train, valid or None, test) positions of each fold: one for a split column, one per fold value (that
    fold is the test set, all others train) for a fold column."""
    if (split is None) == (folds is None):
        raise ValueError("pass exactly one of split (train/valid/test per clip) and folds (fold id per clip)")
    if split is not None:
        split = np.asarray(split)
        valid = np.flatnonzero(np.isin(split, VALID_SPLITS))
        train, test = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
        if not len(train) or not len(test):
            raise ValueError("the split needs 'train' and 'test' clips")
        return [("split", train, valid if len(valid) else None, test)]
    folds = np.asarray(folds)
    if len(folds) != count:
        raise ValueError(f"{len(folds)} fold ids for {count} clips")
    names = sorted(set(folds.tolist()))
    if len(names) < 2:
        raise ValueError("cross-validation needs at least two folds")
    return [(str(name), np.flatnonzero(folds != name), None, np.flatnonzero(folds == name)) for name in names]


def linear_probe(
    embeddings: np.ndarray | torch.Tensor,
    targets: np.ndarray,
    split: Sequence[str] | None = None,
    folds: Sequence[Any] | None = None,
    num_classes: int | None = None,
    multi_label: bool = False,
    seeds: Sequence[int] = SEEDS,
    valid_fraction: float = 0.1,
    *,
    device: str | torch.device | None = None,
    **training_options: Any,
) -> dict[str, Any]:
    """Linear evaluation of fixed embeddings [N, D] with class-index targets [N] (or multi-hot [N, C]).

    Args:
        split: per clip "train", "test" or a validation name ("valid", "validation", "val"); other values are left
            out. Without validation clips, `valid_fraction` of the training clips validate.
        folds: per clip a fold id instead: each fold is the test set once (the others train, `valid_fraction` of
            them validate); the score is the mean over folds.
        num_classes: default: from the targets.
        training_options: `train_linear_classifier`'s training options (lr, weight_decay, batch_size, max_epochs,
            patience); its defaults, the original settings, for those not given.

    Returns:
        `metric` ("accuracy" or "mAP"), `score` (mean over seeds of the mean over folds), `std` (over seeds),
        `per_seed`, `runs` (seed, fold, clip counts, best epoch, epochs run, validation and test scores) and the
        training `settings`.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    y = np.asarray(targets)
    if num_classes is None:
        num_classes = y.shape[1] if multi_label else int(y.max()) + 1
    training = _training_settings(training_options)
    runs, per_seed = [], {}
    for seed in seeds:
        fold_scores = []
        for name, train, valid, test in _experiments(split, folds, len(x)):
            if valid is None:
                kept, held_out = holdout(y[train], valid_fraction, seed, multi_label)
                train, valid = train[kept], train[held_out]
            scaler, layer, info = train_linear_classifier(
                x[train], y[train], x[valid], y[valid], num_classes, multi_label, seed, device=device, **training
            )
            weight = layer.weight
            with torch.no_grad():
                logits = layer(torch.as_tensor(scaler.transform(x[test]), dtype=weight.dtype, device=weight.device))
            score = _score(logits, torch.as_tensor(y[test]), multi_label)
            fold_scores.append(score)
            counts = {"train": len(train), "valid": len(valid), "test": len(test)}
            runs.append({"seed": seed, "fold": name, **counts, **info, "test_score": score})
        per_seed[seed] = float(np.mean(fold_scores))
    scores = list(per_seed.values())
    return {
        "metric": "mAP" if multi_label else "accuracy",
        "score": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "per_seed": per_seed,
        "runs": runs,
        "settings": {"valid_fraction": valid_fraction, **training},
    }


def evaluate_linear_probe(
    model,
    processor,
    evaluation_set: EvaluationSet,
    label_column: str = "label",
    split_column: str | None = "split",
    fold_column: str | None = None,
    embedding: str = "frame_mean",
    multi_label: bool = False,
    label_separator: str = ",",
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: bool = True,
    **probe_options: Any,
) -> dict[str, Any]:
    """Embeds every clip of `evaluation_set` with the frozen model, then runs `linear_probe` on the `split_column`
    (train / valid / test) or, if `fold_column` is given, cross-validates over its folds.

    Args:
        embedding: "frame_mean" (the encoder's clip embedding, the mean of the frame features, as EVAR) or "clap"
            (the CLAP audio embedding).
        probe_options: passed to `linear_probe` (seeds, valid_fraction, lr, max_epochs, ...).
    """
    embeddings = embed_audio(model, processor, evaluation_set.audio_sources(), embedding, batch_size, device, progress)
    values = evaluation_set.column(label_column)
    labels = class_names(values, multi_label, label_separator)
    targets = encode_targets(values, labels, multi_label, label_separator)
    if fold_column is not None:
        partition = {"folds": evaluation_set.column(fold_column)}
    else:
        partition = {"split": evaluation_set.column(split_column)}
    report = linear_probe(
        embeddings.numpy(),
        targets,
        **partition,
        num_classes=len(labels),
        multi_label=multi_label,
        device=device,
        **probe_options,
    )
    return {"embedding": embedding, "embedding_size": embeddings.shape[1], "labels": labels, **report}


__all__ = ["SEEDS", "evaluate_linear_probe", "holdout", "linear_probe", "train_linear_classifier"]
