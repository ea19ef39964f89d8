"""The search page plays (and plots) the sounds of dataset rows, which have no local file: their encoded audio is read
from the index's source again; an index of an in-memory dataset, which cannot be reopened, says so."""

from pathlib import Path

import pytest


pytest.importorskip("faiss", reason="the search tests need faiss-cpu (pip install 'm2d2_hf[search]')")
pytest.importorskip("fastapi", reason="the web page needs the [app] extra (fastapi)")
datasets = pytest.importorskip("datasets")

from fastapi.testclient import TestClient  # noqa: E402

from m2d2_hf.search import SoundIndex, build_index  # noqa: E402
from m2d2_hf.search.app import create_app  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "demo_model")
CLIPS = [
    ROOT / "examples" / "data" / "audio" / name
    for name in ("insect/tux_animals_insects_bee.flac", "wind_instrument/tux_hobbies_music_wind_bassoon.flac")
]


def test_dataset_rows_are_played_from_the_dataset(tmp_path):
    dataset = datasets.Dataset.from_dict({"audio": [str(path) for path in CLIPS]}).cast_column(
        "audio", datasets.Audio()
    )
    dataset.save_to_disk(tmp_path / "saved")
    build_index(MODEL, tmp_path / "saved", tmp_path / "index", progress=False)
    # Addressed as the page is: the app refuses other Host headers.
    client = TestClient(create_app(SoundIndex(tmp_path / "index")), base_url="http://127.0.0.1:7860")
    hits = client.get("/api/search", params={"q": "a bee buzzes", "k": 2}).json()["results"]
    assert {hit["path"] for hit in hits} == {None} and all(hit["audio_url"] for hit in hits)
    for hit in hits:
        row = int(hit["key"].rsplit("#", 1)[1])
        audio = client.get(hit["audio_url"])
        assert audio.status_code == 200 and audio.headers["content-type"] == "audio/flac"
        assert audio.content == CLIPS[row].read_bytes()
    png = client.get(hits[0]["timeline_url"], params={"q": "a bee buzzes"})
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")

    build_index(MODEL, dataset.select([0]), tmp_path / "in_memory", progress=False)
    client = TestClient(create_app(SoundIndex(tmp_path / "in_memory")), base_url="http://127.0.0.1:7860")
    (hit,) = client.get("/api/search", params={"q": "a bee buzzes", "k": 1}).json()["results"]
    assert hit["audio_url"] is None
    missing = client.get("/api/audio/0")
    assert missing.status_code == 404 and "in-memory dataset" in missing.json()["detail"]
