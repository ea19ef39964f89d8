"""Tests of the caption-embedding cache (`m2d2_hf.training.captions`) and its command line."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from m2d2_hf.training.captions import (
    CaptionEmbeddingTable,
    CaptionEncoder,
    embed_captions,
    read_captions,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "examples" / "cache_caption_embeddings.py"

TEXTS = [
    "A dog barks twice",
    "Rain falls on a tin roof while thunder rumbles in the distance",
    "A violin",
    "Someone types quickly on a mechanical keyboard, then stops",
    "Birds sing",
]


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------


def test_read_captions_csv_with_repeated_ids(tmp_path):
    path = tmp_path / "captions.csv"
    path.write_text(
        "id,caption,other\n"
        "00123,A dog barks,x\n"
        'clip_b,"A bell rings, twice",y\n'
        "00123,A puppy yaps,z\n"
        "00123,A dog barks,z\n"  # exact repeat: dropped
        "clip_c,,w\n"  # no caption: left out
    )
    assert read_captions(path) == {"00123": ["A dog barks", "A puppy yaps"], "clip_b": ["A bell rings, twice"]}
    assert read_captions(path, separator=",") == {
        "00123": ["A dog barks", "A puppy yaps"],
        "clip_b": ["A bell rings", "twice"],
    }
    with pytest.raises(ValueError, match="no caption column 'text'"):
        read_captions(path, caption_column="text")


def test_read_captions_jsonl_and_parquet(tmp_path):
    path = tmp_path / "captions.jsonl"
    rows = [
        {"ytid": "a", "captions": ["Wind blows", "A gust of wind"]},
        {"ytid": "b", "captions": "A car passes"},
        {"ytid": "a", "captions": ["Leaves rustle"]},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = {"a": ["Wind blows", "A gust of wind", "Leaves rustle"], "b": ["A car passes"]}
    assert read_captions(path, id_column="ytid", caption_column="captions") == expected

    lists = [["Wind blows", "A gust of wind"], ["A car passes"], ["Leaves rustle"]]
    table = pa.table({"ytid": ["a", "b", "a"], "captions": lists})
    pq.write_table(table, tmp_path / "captions.parquet")
    assert read_captions(tmp_path / "captions.parquet", id_column="ytid", caption_column="captions") == expected


def test_read_captions_from_real_sounds_folder(real_sounds_dir):
    captions = read_captions(real_sounds_dir)
    with open(real_sounds_dir / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(captions) == len(rows) == 251
    for row in rows:
        assert captions[Path(row["file_name"]).stem] == [row["caption"]]


# ----------------------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_hidden(tokenizer_dir):
    """Per-text last hidden states of all-MiniLM-L6-v2, each text run alone (no padding at all)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModel.from_pretrained(tokenizer_dir).eval()

    def hidden(texts):
        with torch.no_grad():
            return [model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0] for text in texts]

    return hidden


@pytest.fixture(scope="module")
def mean_encoder(tokenizer_dir) -> CaptionEncoder:
    return CaptionEncoder(tokenizer_dir, pooling="mean", device="cpu", batch_size=3)


def test_mean_pooling_equals_masked_mean(mean_encoder, reference_hidden):
    embeddings = mean_encoder.encode(TEXTS)
    assert embeddings.shape == (5, 384) and embeddings.dtype == np.float32
    expected = np.stack([h.mean(dim=0).numpy() for h in reference_hidden(TEXTS)])
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=1e-5)

    # fp16 storage of the same values; several captions per clip keep their order.
    captions = {"x": [TEXTS[1], TEXTS[0]], "y": [TEXTS[4]], "z": TEXTS[2:4]}
    stored = embed_captions(captions, mean_encoder, progress=False)
    assert set(stored) == {"x", "y", "z"}
    assert stored["x"].dtype == np.float16 and stored["x"].shape == (2, 384)
    # (other batches than above: float32 sums in another order, so allow one fp16 rounding step)
    np.testing.assert_allclose(stored["x"].astype(np.float32), expected[[1, 0]], rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(stored["z"].astype(np.float32), expected[2:4], rtol=1e-3, atol=1e-5)
    assert np.mean(stored["y"][0] == expected[4].astype(np.float16)) > 0.98


def test_sentence_transformers_encode_is_normalised_mean(tokenizer_dir, mean_encoder):
    pytest.importorskip("sentence_transformers")
    encoder = CaptionEncoder(tokenizer_dir, pooling="encode", device="cpu")
    assert encoder.sentence_transformer is not None
    expected = mean_encoder.encode(TEXTS)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(encoder.encode(TEXTS), expected, rtol=0, atol=1e-5)


def test_cls_and_last_pooling(tokenizer_dir, reference_hidden):
    hidden = reference_hidden(TEXTS)
    cls = CaptionEncoder(tokenizer_dir, pooling="cls", device="cpu").encode(TEXTS)
    last = CaptionEncoder(tokenizer_dir, pooling="last", device="cpu").encode(TEXTS)
    assert cls.shape == last.shape == (5, 384)
    np.testing.assert_allclose(cls, np.stack([h[0].numpy() for h in hidden]), rtol=0, atol=1e-5)
    # The last non-pad token ([SEP]) of each text, although the batch pads the shorter texts.
    np.testing.assert_allclose(last, np.stack([h[-1].numpy() for h in hidden]), rtol=0, atol=1e-5)
    assert np.abs(cls - last).max() > 1e-2


def test_instruction_prefix(tokenizer_dir, mean_encoder):
    prefix = "Represent this sound description: "
    instructed = CaptionEncoder(tokenizer_dir, pooling="mean", device="cpu", instruction=prefix).encode(TEXTS)
    plain = mean_encoder.encode(TEXTS)
    assert np.abs(instructed - plain).max() > 1e-2
    np.testing.assert_allclose(instructed, mean_encoder.encode([prefix + t for t in TEXTS]), rtol=0, atol=1e-5)
    normalised = CaptionEncoder(tokenizer_dir, pooling="mean", device="cpu", normalize=True).encode(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, atol=1e-6)


def test_encode_pooling_needs_an_encode_method(tmp_path, tokenizer_dir):
    # The same weights without the sentence-transformers files: a plain BertModel has no `encode`.
    plain = tmp_path / "plain"
    AutoModel.from_pretrained(tokenizer_dir).save_pretrained(plain)
    with pytest.raises(ValueError, match="own `encode` method"):
        CaptionEncoder(plain, pooling="encode", device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# Cache folder and command line
# ----------------------------------------------------------------------------------------------------------------


def _load_cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location("cache_caption_embeddings", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_dict(path) -> dict[str, np.ndarray]:
    table = CaptionEmbeddingTable.from_path(path)
    return {clip_id: np.array(table.get(clip_id)) for clip_id in table}


def test_cli_writes_a_resumable_cache(tmp_path, tokenizer_dir, mean_encoder):
    captions_csv = tmp_path / "captions.csv"
    rows = [("c0", TEXTS[0]), ("c1", TEXTS[1]), ("c0", TEXTS[2]), ("c2", TEXTS[3]), ("c3", TEXTS[4]), ("c0", TEXTS[4])]
    rows += [("c4", TEXTS[2]), ("c4", TEXTS[3])]
    with open(captions_csv, "w", newline="") as handle:
        csv.writer(handle).writerows([("clip", "text"), *rows])
    output = tmp_path / "cache"
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    args = [
        "--captions", str(captions_csv), "--model", str(tokenizer_dir), "--output", str(output),
        "--pooling", "mean", "--id-column", "clip", "--caption-column", "text", "--device", "cpu",
        "--batch-size", "4", "--shard-size", "2", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["num_new"] == 5

    shards = sorted(p.name for p in output.glob("shard-*.parquet"))
    assert shards == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    info = json.loads((output / "info.json").read_text())
    assert info["dim"] == 384 and info["pooling"] == "mean" and info["instruction"] == ""

    table = CaptionEmbeddingTable.from_path(output)
    assert len(table) == 5 and set(table) == {"c0", "c1", "c2", "c3", "c4"} and table.embedding_size == 384
    assert "c9" not in table and table.get("c9") is None
    expected = mean_encoder.encode(TEXTS)
    for clip_id, indices in {"c0": [0, 2, 4], "c1": [1], "c2": [3], "c3": [4], "c4": [2, 3]}.items():
        stored = table.get(clip_id)
        assert stored.dtype == np.float16 and stored.shape == (len(indices), 384)
        np.testing.assert_allclose(stored.astype(np.float32), expected[indices], rtol=0, atol=2e-3)
    before = _table_dict(output)
    mtimes = {p.name: p.stat().st_mtime_ns for p in output.glob("shard-*.parquet")}

    # A second run is a no-op: no new shard, nothing rewritten.
    cli = _load_cli()
    summary = cli.main(args)
    assert summary["num_new"] == 0 and summary["shards_written"] == []
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("shard-*.parquet")} == mtimes

    # After losing one shard, only its ids are recomputed (into a new shard).
    lost = set(pq.read_table(output / "shard-00001.parquet", columns=["id"]).column("id").to_pylist())
    (output / "shard-00001.parquet").unlink()
    summary = cli.main(args)
    assert summary["num_new"] == len(lost) == 2 and summary["shards_written"] == ["shard-00003.parquet"]
    assert set(pq.read_table(output / "shard-00003.parquet", columns=["id"]).column("id").to_pylist()) == lost
    after = _table_dict(output)
    assert set(after) == set(before)
    for clip_id in before:
        np.testing.assert_allclose(after[clip_id], before[clip_id], rtol=0, atol=1e-3)

    # Other settings on the same folder are refused.
    with pytest.raises(ValueError, match="other settings"):
        cli.main([*args, "--instruction", "query: "])


def test_table_reads_typed_list_parquet(tmp_path):
    embeddings = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((1, 3), np.float32)]
    table = pa.table({"id": ["a", "b"], "embeddings": [e.tolist() for e in embeddings]})
    pq.write_table(table, tmp_path / "external.parquet")
    loaded = CaptionEmbeddingTable.from_path(tmp_path / "external.parquet")
    assert len(loaded) == 2 and loaded.embedding_size == 3
    np.testing.assert_array_equal(loaded.get("a"), embeddings[0].astype(np.float16))
    np.testing.assert_array_equal(loaded.get("b"), embeddings[1].astype(np.float16))
