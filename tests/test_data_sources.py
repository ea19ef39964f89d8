"""Tests of `m2d2_hf.data.sources`: what kind of source a path is, and its rows."""

import os

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m2d2_hf.data.sources import (
    DataSource,
    audio_files_below,
    cast_audio_undecoded,
    choose_split,
    file_stem,
    find_metadata,
    is_saved_dataset,
    kind_of_files,
    load_saved_dataset,
    metadata_rows,
    read_table,
    resolve_path,
    source_kind,
    split_files,
)


def write(path, text=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """save_to_disk folders of a Dataset and of a two-split DatasetDict."""
    root = tmp_path_factory.mktemp("saved")
    table = {"audio": [{"bytes": b"x", "path": "a.wav"}], "label": ["dog"]}
    single = datasets.Dataset.from_dict(table).cast_column("audio", datasets.Audio())
    single.save_to_disk(root / "single")
    test = datasets.Dataset.from_dict({**table, "label": ["cat"]}).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"train": single, "test": test}).save_to_disk(root / "dict")
    return root


def test_source_kind_of_each_layout(tmp_path, saved):
    metadata = write(tmp_path / "folder" / "metadata.csv", "file_name\na.wav\n")
    split_metadata = write(tmp_path / "folder" / "test" / "metadata.jsonl", '{"file_name": "b.wav"}\n')
    assert source_kind(tmp_path / "folder") == DataSource("audiofolder", str(tmp_path / "folder"), str(metadata))
    assert source_kind(tmp_path / "folder", split="test").metadata == str(split_metadata)
    assert source_kind(tmp_path / "folder").base == str(metadata.parent)
    assert source_kind(saved / "single").kind == source_kind(saved / "dict").kind == "saved_dataset"
    shards = [write(tmp_path / "pq" / f"{split}-0.parquet") for split in ("train", "test")]
    assert source_kind(tmp_path / "pq", split="test").files == [str(shards[1])]
    assert source_kind(tmp_path / "pq").files == sorted(str(s) for s in shards)
    assert source_kind(write(tmp_path / "wds" / "x" / "000.tar").parent.parent).kind == "webdataset"
    write(tmp_path / "plain" / "sub" / "a.FLAC")
    assert source_kind(tmp_path / "plain").kind == "audio_files"
    listed = write(tmp_path / "files.csv", "audio\na.wav\n")
    assert source_kind(listed) == DataSource("table", str(listed), str(listed), [str(listed)])
    assert source_kind(shards[0]).kind == "parquet"  # one Parquet file: shards of encoded audio
    assert source_kind(str(tmp_path / "pq" / "*.parquet")).files == sorted(str(s) for s in shards)
    assert source_kind([shards[0], shards[1]]).kind == "parquet"
    assert source_kind("hf://datasets/x/*.parquet").files == ["hf://datasets/x/*.parquet"]
    assert source_kind("someone/some-dataset") == DataSource("hub", "someone/some-dataset")


def test_source_kind_errors(tmp_path):
    with pytest.raises(ValueError, match=r"mix of file types \['csv', 'parquet'\]"):
        source_kind(["a.parquet", "b.csv"])
    with pytest.raises(ValueError, match="is a file but not a metadata table"):
        source_kind(write(tmp_path / "a.wav"))
    assert kind_of_files(["a.jsonl", "b.json"]) == "table"


def test_file_stem_and_paths(tmp_path):
    assert file_stem("a/b/clip.flac") == "clip"
    assert file_stem("C:\\x\\clip.wav") == "clip"
    assert file_stem("data/clip.flac::archive.zip") == "clip"
    assert file_stem(".hidden") == ".hidden" and file_stem("") is None and file_stem(None) is None
    assert resolve_path("/base", "a.wav") == os.path.join("/base", "a.wav")
    assert resolve_path("/base", "/abs/a.wav") == "/abs/a.wav"
    assert resolve_path("/base", "hf://x/a.wav") == "hf://x/a.wav"
    assert resolve_path("/base", "") is None and resolve_path(None, "a.wav") == "a.wav"
    write(tmp_path / "b" / "x.WAV")
    write(tmp_path / "a.flac")
    write(tmp_path / "notes.txt")
    assert audio_files_below(tmp_path) == [tmp_path / "a.flac", tmp_path / "b" / "x.WAV"]
    assert split_files(["d/train/a", "d/test/b"], "test") == ["d/test/b"]
    assert split_files(["train-0.tar", "valid-0.tar"], "valid") == ["valid-0.tar"]
    assert split_files(["a.tar", "b.tar"], "test") == ["a.tar", "b.tar"]
    assert find_metadata(tmp_path) is None


def test_read_table_and_metadata_rows(tmp_path):
    csv = write(tmp_path / "metadata.csv", "file_name,id,label,split\na.wav,007,1,train\nb.wav,008,,test\n")
    typed = read_table(csv, string_columns=["id"]).to_pylist()
    assert typed[0] == {"file_name": "a.wav", "id": "007", "label": 1, "split": "train"}
    strings = read_table(csv, all_strings=True).to_pylist()
    assert strings[1] == {"file_name": "b.wav", "id": "008", "label": "", "split": "test"}  # as csv.DictReader
    write(tmp_path / "m.tsv", "path\tx\nc.wav\t2\n")
    assert read_table(tmp_path / "m.tsv").to_pylist() == [{"path": "c.wav", "x": 2}]
    write(tmp_path / "m.jsonl", '{"audio": "d.wav"}\n')
    assert read_table(tmp_path / "m.jsonl").to_pylist() == [{"audio": "d.wav"}]
    pq.write_table(pa.table({"file_name": ["e.wav"]}), tmp_path / "m.parquet")
    assert read_table(tmp_path / "m.parquet").to_pylist() == [{"file_name": "e.wav"}]
    with pytest.raises(ValueError, match="Unsupported metadata file"):
        read_table(write(tmp_path / "m.txt"))

    rows, column = metadata_rows(csv, ("path", "file_name"), split="test")
    assert column == "file_name" and [row["file_name"] for row in rows] == ["b.wav"]
    with pytest.raises(ValueError, match="none of the path columns"):
        metadata_rows(tmp_path / "m.tsv", ("file_name",))
    with pytest.raises(ValueError, match="has no 'fold' column"):
        metadata_rows(csv, split="x", split_column="fold")
    with pytest.raises(ValueError, match="lists no audio files with split == 'dev'"):
        metadata_rows(csv, split="dev")


def test_saved_datasets_and_splits(saved, tmp_path):
    assert is_saved_dataset(saved / "single") and is_saved_dataset(saved / "dict")
    assert not is_saved_dataset(tmp_path) and not is_saved_dataset(tmp_path / "absent")
    assert len(load_saved_dataset(saved / "single")) == 1
    assert load_saved_dataset(saved / "dict", "test")["label"] == ["cat"]
    with pytest.raises(ValueError, match=r"has the splits \['train', 'test'\]: choose one"):
        load_saved_dataset(saved / "dict")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        load_saved_dataset(saved / "dict", "dev")
    assert choose_split(["train"], "test") == "train" and choose_split(["a", "b"], "b") == "b"
    undecoded = cast_audio_undecoded(load_saved_dataset(saved / "single"), "audio")
    assert undecoded.features["audio"].decode is False and undecoded[0]["audio"]["bytes"] == b"x"
    other = load_saved_dataset(saved / "single").cast_column("audio", datasets.Audio())
    assert cast_audio_undecoded(other, "clip").features["audio"].decode is True  # only the named column
    assert cast_audio_undecoded(other).features["audio"].decode is False  # or all of them
