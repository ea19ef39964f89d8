"""The evaluation suite end to end: zero-shot, retrieval and linear probe on real clips with the tiny CLAP model,
checked against the same quantities computed directly with the model; data loading; the example scripts."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from datasets import Audio, Dataset, DatasetDict
from transformers import AutoModel, AutoProcessor

from m2d2_hf.data.audio import decode_audio
from m2d2_hf.data.labels import encode_targets
from m2d2_hf.evaluation import (
    EvaluationSet,
    embed_audio,
    evaluate_linear_probe,
    evaluate_retrieval,
    linear_probe,
    load_evaluation_set,
    zero_shot_classify,
)
from m2d2_hf.evaluation.data import caption_groups
from m2d2_hf.evaluation.linear_probe import holdout, train_linear_classifier
from m2d2_hf.evaluation.metrics import audio_to_text_metrics, mean_average_precision, text_to_audio_metrics
from m2d2_hf.prompts import PromptError


REPO_ROOT = Path(__file__).resolve().parents[1]
ZERO_SHOT_LABELS = ["speech_digit", "wild_animal", "speech_word"]


@pytest.fixture(scope="module")
def clap(tiny_clap_dir):
    return AutoModel.from_pretrained(tiny_clap_dir).eval(), AutoProcessor.from_pretrained(tiny_clap_dir)


@pytest.fixture(scope="module")
def real_test_split(real_sounds_dir) -> EvaluationSet:
    return load_evaluation_set(real_sounds_dir, split="test")


@pytest.fixture(scope="module")
def twelve_clips(real_test_split) -> EvaluationSet:
    """4 test clips of each of 3 labels."""
    labels = real_test_split.column("label")
    positions = [p for label in ZERO_SHOT_LABELS for p in [i for i, v in enumerate(labels) if v == label][:4]]
    return real_test_split.select(positions)


def direct_audio_embeddings(model, processor, evaluation_set: EvaluationSet) -> torch.Tensor:
    """CLAP audio embeddings clip by clip, straight from the files and the model."""
    rows = []
    for position in range(len(evaluation_set)):
        wave, rate = sf.read(str(evaluation_set.audio(position)), dtype="float32")
        with torch.no_grad():
            rows.append(model.get_audio_features(**processor(audio=wave, sampling_rate=rate)).pooler_output[0])
    return torch.stack(rows)


def direct_text_embeddings(model, processor, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.get_text_features(**processor(text=[text])).pooler_output for text in texts])


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


def test_folder_split_and_limit(real_sounds_dir, real_test_split):
    assert len(real_test_split) == 60
    assert set(real_test_split.column("split")) == {"test"}
    assert len(load_evaluation_set(real_sounds_dir, split="test", limit=5)) == 5


def test_datasets_sources_decode_like_the_folder(real_sounds_dir, real_test_split):
    subset = real_test_split.select(range(3))
    paths = [str(subset.audio(p)) for p in range(3)]
    expected = [decode_audio(path, 16000) for path in paths]
    by_path = Dataset.from_dict({"audio": paths, "label": subset.column("label")}).cast_column("audio", Audio())
    by_bytes = Dataset.from_dict(
        {"audio": [{"bytes": Path(path).read_bytes(), "path": None} for path in paths], "split": ["test", "x", "test"]}
    ).cast_column("audio", Audio(decode=False))
    from_path = EvaluationSet.from_dataset(by_path)
    assert from_path.column("label") == subset.column("label")
    for position, wave in enumerate(expected):
        np.testing.assert_array_equal(decode_audio(from_path.audio(position), 16000), wave)
        np.testing.assert_array_equal(decode_audio(by_bytes[position]["audio"], 16000), wave)
    # Resampling: a 16 kHz clip read at 8 kHz has half the samples.
    assert len(decode_audio(paths[0], 8000)) == pytest.approx(len(expected[0]) / 2, abs=1)
    # A datasets source without that split name filters on the split column; a DatasetDict's split is taken whole.
    assert len(load_evaluation_set(by_bytes, split="test")) == 2
    assert len(load_evaluation_set(DatasetDict({"train": by_path, "test": by_bytes}), split="test")) == 3


def test_rows_of_one_file_are_one_clip(tmp_path, real_sounds_dir):
    source = real_sounds_dir / "audio/alarm/fd_alarm_clock_elapsed.flac"
    (tmp_path / "a.flac").write_bytes(source.read_bytes())
    with open(tmp_path / "metadata.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["file_name", "caption"], ["a.flac", "an alarm"], ["a.flac", "a clock rings"]])
    groups = caption_groups(load_evaluation_set(tmp_path), ["caption"])
    assert [captions for _, captions in groups] == [["an alarm", "a clock rings"]]


def test_encode_targets():
    labels = ["a", "b", "c"]
    assert encode_targets(["b", "a", 2], labels).tolist() == [1, 0, 2]
    assert encode_targets(["a, c", ["b"]], labels, multi_label=True).tolist() == [[1, 0, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="not one of"):
        encode_targets(["d"], labels)


def test_short_clips_are_zero_padded_to_the_minimum(clap):
    model, processor = clap
    short = np.random.default_rng(0).normal(size=800).astype(np.float32) * 0.1  # 0.05 s
    padded = np.pad(short, (0, processor.feature_extractor.min_samples - 800))
    embedding = embed_audio(model, processor, [short], progress=False)
    with torch.no_grad():
        expected = model.get_audio_features(**processor(audio=padded, sampling_rate=16000)).pooler_output
    torch.testing.assert_close(embedding, expected)


# ---------------------------------------------------------------------------------------------------------------------
# Zero-shot
# ---------------------------------------------------------------------------------------------------------------------


def test_zero_shot_matches_the_model(clap, twelve_clips):
    model, processor = clap
    report = zero_shot_classify(model, processor, twelve_clips, labels=ZERO_SHOT_LABELS, batch_size=5, progress=False)

    assert report["prompts"] == ["speech digit can be heard", "wild animal can be heard", "speech word can be heard"]
    cosine = (
        direct_audio_embeddings(model, processor, twelve_clips)
        @ direct_text_embeddings(model, processor, report["prompts"]).T
    )
    argmax = cosine.argmax(1).tolist()
    assert [ranked[0] for ranked in report["predictions"]] == [ZERO_SHOT_LABELS[i] for i in argmax]
    targets = [ZERO_SHOT_LABELS.index(label) for label in twelve_clips.column("label")]
    assert report["num_clips"] == 12
    assert report["top1_accuracy"] == pytest.approx(np.mean(np.array(argmax) == np.array(targets)))
    assert report["top5_accuracy"] == 1.0  # 3 classes
    assert {label: entry["clips"] for label, entry in report["per_class"].items()} == dict.fromkeys(
        ZERO_SHOT_LABELS, 4
    )
    for entry in report["per_class"].values():
        assert 0.0 <= entry["top1_accuracy"] <= 1.0


def test_zero_shot_refuses_a_repeated_label_before_embedding(clap, twelve_clips):
    model, processor = clap

    def never_read():
        raise AssertionError("audio was read before the labels were checked")
        yield

    with pytest.raises(PromptError, match=r"the labels repeat \['wild_animal'\]"):
        zero_shot_classify(model, processor, never_read(), labels=[*ZERO_SHOT_LABELS, "wild_animal"], progress=False)


def test_zero_shot_multi_label_from_pairs(clap, twelve_clips):
    model, processor = clap
    # Two labels per clip: its label and its category (speech / animal).
    pairs = [(twelve_clips.audio(p), [row["label"], row["category"]]) for p, row in enumerate(twelve_clips.rows)]
    report = zero_shot_classify(model, processor, iter(pairs), multi_label=True, progress=False)

    labels = report["labels"]
    assert labels == sorted(set(ZERO_SHOT_LABELS) | {"speech", "animal"})
    cosine = (
        direct_audio_embeddings(model, processor, twelve_clips)
        @ direct_text_embeddings(model, processor, report["prompts"]).T
    )
    targets = encode_targets([targets for _, targets in pairs], labels, multi_label=True)
    assert 0.0 <= report["mAP"] <= 1.0
    assert report["mAP"] == pytest.approx(mean_average_precision(torch.sigmoid(cosine).numpy(), targets), abs=1e-6)
    assert report["per_class"]["speech"]["positives"] == 8


# ---------------------------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------------------------


def test_retrieval_matches_the_model(clap, real_test_split):
    model, processor = clap
    clips = real_test_split.select(range(0, 60, 6))  # 10 clips of different labels
    # Two captions per clip: the real caption and one made from the label.
    pairs = [(clips.audio(p), [row["caption"], f"the sound of {row['label']}"]) for p, row in enumerate(clips.rows)]
    report = evaluate_retrieval(model, processor, pairs, batch_size=4, chunk_size=3, progress=False)

    captions = [caption for _, texts in pairs for caption in texts]
    caption_audio = [clip for clip in range(10) for _ in range(2)]
    similarity = (
        direct_audio_embeddings(model, processor, clips) @ direct_text_embeddings(model, processor, captions).T
    )
    assert (report["num_clips"], report["num_captions"]) == (10, 20)
    assert report["audio_to_text"] == pytest.approx(audio_to_text_metrics(similarity, caption_audio))
    assert report["text_to_audio"] == pytest.approx(text_to_audio_metrics(similarity, caption_audio))
    for direction in ("audio_to_text", "text_to_audio"):
        values = [report[direction][name] for name in ("R@1", "R@5", "R@10", "mAP@10")]
        assert all(0.0 <= value <= 1.0 for value in values)
        assert values[0] <= values[1] <= values[2]


# ---------------------------------------------------------------------------------------------------------------------
# Linear probe
# ---------------------------------------------------------------------------------------------------------------------


def separable(seed: int = 0, dims: int = 256, classes: int = 4, per_class: int = 100):
    """Gaussian clusters far apart relative to their spread, and a train/test split column."""
    rng = np.random.default_rng(seed)
    targets = np.repeat(np.arange(classes), per_class)
    embeddings = rng.normal(size=(classes, dims))[targets] * 2 + rng.normal(size=(len(targets), dims))
    split = np.where(rng.random(len(targets)) < 0.25, "test", "train")
    return embeddings.astype(np.float32), targets, split


def test_linear_probe_separates_separable_embeddings():
    # The original settings (Adam lr 3e-5, 200 epochs, ...) on 256-d clusters.
    embeddings, targets, split = separable()
    report = linear_probe(embeddings, targets, split=split, seeds=(42, 43), device="cpu")
    assert report["metric"] == "accuracy"
    assert report["score"] == 1.0
    assert [run["seed"] for run in report["runs"]] == [42, 43]


def test_linear_probe_on_shuffled_labels_stays_near_chance():
    embeddings, targets, split = separable()
    shuffled = np.random.default_rng(1).permutation(targets)
    report = linear_probe(embeddings, shuffled, split=split, seeds=(42,), device="cpu")
    assert report["score"] < 0.4  # chance is 0.25; about 100 test clips
    assert report["runs"][0]["epochs"] < 200  # no validation gain for 20 epochs stopped it early


def test_linear_probe_restores_the_best_epoch():
    embeddings, targets, _ = separable(dims=16)
    shuffled = np.random.default_rng(2).permutation(targets)
    train, valid = holdout(shuffled, 0.25, seed=0)
    scaler, layer, info = train_linear_classifier(
        embeddings[train], shuffled[train], embeddings[valid], shuffled[valid], 4, lr=1e-2, patience=5, device="cpu"
    )
    with torch.no_grad():
        logits = layer(torch.as_tensor(scaler.transform(embeddings[valid]), dtype=torch.float32))
    assert info["best_epoch"] < info["epochs"]
    assert float((logits.argmax(1).numpy() == shuffled[valid]).mean()) == info["valid_score"]


def test_holdout_is_stratified():
    targets = np.repeat([0, 1, 2], [10, 20, 3])
    train, valid = holdout(targets, 0.2, seed=0)
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(33))
    assert np.bincount(targets[valid]).tolist() == [2, 4, 1]  # round(0.2 · n) per class


def test_linear_probe_cross_validation_averages_folds():
    embeddings, targets, _ = separable(dims=64, per_class=30)
    folds = np.arange(len(targets)) % 3
    report = linear_probe(embeddings, targets, folds=folds, seeds=(7,), lr=1e-3, max_epochs=30, device="cpu")
    assert [run["fold"] for run in report["runs"]] == ["0", "1", "2"]
    assert [run["test"] for run in report["runs"]] == [40, 40, 40]
    assert report["score"] == pytest.approx(np.mean([run["test_score"] for run in report["runs"]]))


def test_linear_probe_end_to_end_on_real_sounds(clap, real_sounds_dir):
    model, processor = clap
    evaluation_set = load_evaluation_set(real_sounds_dir)  # includes clips shorter than 0.15 s
    report = evaluate_linear_probe(
        model, processor, evaluation_set, batch_size=16, seeds=(42,), max_epochs=10, device="cpu", progress=False
    )
    assert report["embedding"] == "frame_mean"
    assert report["embedding_size"] == 5 * model.config.audio_config.hidden_size
    assert len(report["labels"]) == 22
    run = report["runs"][0]
    assert (run["train"] + run["valid"], run["test"]) == (191, 60)
    assert 0.0 <= report["score"] <= 1.0


# ---------------------------------------------------------------------------------------------------------------------
# Example scripts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script, options, keys",
    [
        ("evaluate_zero_shot.py", ["--split", "test", "--limit", "6"], ["top1_accuracy", "per_class", "predictions"]),
        ("evaluate_retrieval.py", ["--split", "test", "--limit", "6"], ["audio_to_text", "text_to_audio"]),
        (
            "evaluate_linear_probe.py",
            ["--limit", "40", "--seeds", "1", "--max-epochs", "3", "--valid-fraction", "0.3"],
            ["score", "runs", "labels"],
        ),
    ],
)
def test_example_script_writes_a_report(script, options, keys, tiny_clap_dir, real_sounds_dir, tmp_path):
    output = tmp_path / "report.json"
    command = [sys.executable, str(REPO_ROOT / "examples" / script), str(tiny_clap_dir), str(real_sounds_dir)]
    result = subprocess.run(
        command + options + ["--device", "cpu", "--output", str(output)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(output.read_text())
    assert all(key in report for key in keys)
    assert report["model"] == str(tiny_clap_dir)
    assert "-----" in result.stdout  # the table
