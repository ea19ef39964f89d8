"""The live index: updates that embed only added and changed sounds (renamed, moved and touched ones reused by content
hash, deleted ones gone), indexes of the first format read and upgraded, and embedding spaces of several models in
one index, switched on disk (`m2d2-hf index-space --activate`) and in a running server (`POST /api/space`) without a
failed or mixed answer."""

import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest


pytest.importorskip("faiss", reason="the search tests need faiss-cpu (pip install 'm2d2_hf[search]')")

import pyarrow.parquet as pq  # noqa: E402

from m2d2_hf.cli import main  # noqa: E402
from m2d2_hf.search import DamagedIndexError, SoundIndex, build_index, building  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]
MODEL = str(ROOT / "examples" / "demo_model")
AUDIO = ROOT / "examples" / "data" / "audio"
CLIPS = (
    "insect/tux_animals_insects_bee.flac",
    "bird/tux_animals_birds_seagull.flac",
    "wind_instrument/tux_hobbies_music_wind_bassoon.flac",
    "string_instrument/tux_hobbies_music_string_violin.flac",
)
QUERIES = ("a bee buzzes", "a seagull", "a bassoon plays", "a violin", "a dog barks")


def _clips(folder: Path, names=CLIPS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(AUDIO / name, folder / Path(name).name)
    return folder


def _counts(summary) -> tuple[int, int, int]:
    return summary.embedded_files, summary.reused_files, summary.moved_files


def _space_rows(folder: Path, space: str | None = None):
    space_folder, _ = building.open_space(folder, space)
    return pq.read_table(space_folder / "items.parquet")


def _embeddings_by_key(folder: Path) -> dict:
    rows = _space_rows(folder)
    vectors = building.embeddings_of(rows)
    grouped: dict = {}
    for key, vector in zip(rows.column("key").to_pylist(), vectors):
        grouped.setdefault(key, []).append(vector.tolist())
    return grouped


@pytest.fixture
def decodes(monkeypatch) -> list:
    """The sounds decoded for embedding, as they are decoded."""
    calls = []
    decode = building.decode_audio
    monkeypatch.setattr(
        building, "decode_audio", lambda value, **kwargs: (calls.append(value), decode(value, **kwargs))[1]
    )
    return calls


def test_update_embeds_added_reuses_renamed_moved_touched_and_drops_deleted(tmp_path, decodes):
    sounds = _clips(tmp_path / "sounds", CLIPS[:3])
    output = tmp_path / "index"
    assert _counts(build_index(MODEL, sounds, output, progress=False)) == (3, 0, 0)
    before = _embeddings_by_key(output)

    _clips(sounds, CLIPS[3:])  # added
    decodes.clear()
    assert _counts(build_index(MODEL, sounds, output, progress=False, update=True)) == (1, 3, 0)
    assert len(decodes) == 1

    bee, gull, bassoon, violin = (sounds / Path(name).name for name in CLIPS)
    renamed = bee.rename(sounds / "bee_renamed.flac")
    (sounds / "moved").mkdir()
    moved = gull.rename(sounds / "moved" / gull.name)
    status = bassoon.stat()
    os.utime(bassoon, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # touched: same bytes, another mtime
    decodes.clear()
    lines = []
    summary = build_index(MODEL, sounds, output, progress=False, update=True, log=lines.append)
    assert _counts(summary) == (0, 1, 3) and decodes == []
    assert "3 renamed, moved or touched (reused by content), 0 to embed" in lines[0]
    after = _embeddings_by_key(output)
    assert after[str(renamed.resolve())] == before[str(bee.resolve())]
    assert after[str(moved.resolve())] == before[str(gull.resolve())]
    assert str(bee.resolve()) not in after and str(gull.resolve()) not in after
    rows = _space_rows(output)
    paths = dict(zip(rows.column("key").to_pylist(), rows.column("path").to_pylist()))
    stamps = dict(zip(rows.column("key").to_pylist(), rows.column("stamp").to_pylist()))
    hashes = dict(zip(rows.column("key").to_pylist(), rows.column("content_hash").to_pylist()))
    assert paths[str(renamed.resolve())] == str(renamed.resolve())
    assert stamps[str(bassoon.resolve())] == f"{bassoon.stat().st_size}:{bassoon.stat().st_mtime_ns}"
    assert hashes[str(violin.resolve())] == hashlib.sha256(violin.read_bytes()).hexdigest()

    violin.unlink()  # deleted: no hit for it any more
    assert _counts(build_index(MODEL, sounds, output, progress=False, update=True)) == (0, 3, 0)
    index = SoundIndex(output)
    results = index.search(text=list(QUERIES), top_k=len(index))
    assert all(hit["key"] != str(violin.resolve()) for result in results for hit in result["results"])
    assert len(index) == 3


def test_an_interrupted_update_resumes_its_reused_sounds(tmp_path, monkeypatch, decodes):
    sounds = _clips(tmp_path / "sounds", CLIPS[:2])
    output = tmp_path / "index"
    build_index(MODEL, sounds, output, progress=False)
    (sounds / Path(CLIPS[0]).name).rename(sounds / "renamed.flac")
    _clips(sounds, CLIPS[2:3])
    write_index = building._write_index
    monkeypatch.setattr(building, "_write_index", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        build_index(MODEL, sounds, output, progress=False)
    monkeypatch.setattr(building, "_write_index", write_index)
    decodes.clear()
    # The reused rows and the embedded sound are shards of the interrupted run: nothing is embedded again.
    assert _counts(build_index(MODEL, sounds, output, progress=False)) == (0, 3, 0) and decodes == []
    assert str((sounds / "renamed.flac").resolve()) in _embeddings_by_key(output)


def test_update_needs_an_index_of_this_model(tmp_path):
    sounds = _clips(tmp_path / "sounds", CLIPS[:1])
    with pytest.raises(ValueError, match=r"--update: .* holds no index of this model .* drop --update to build one"):
        build_index(MODEL, sounds, tmp_path / "index", progress=False, update=True)


def test_a_first_format_index_is_read_then_upgraded_with_hashes(tmp_path, decodes):
    sounds = _clips(tmp_path / "sounds", CLIPS[:2])
    build_index(MODEL, sounds, tmp_path / "built", progress=False)
    # A space folder is laid out as an index of the first format; one written before hashes were recorded lacks them.
    legacy = tmp_path / "legacy"
    shutil.copytree(building.open_space(tmp_path / "built")[0], legacy)
    table = pq.read_table(legacy / "items.parquet")
    pq.write_table(table.drop_columns(["content_hash"]), legacy / "items.parquet")
    index = SoundIndex(legacy)
    assert len(index) == 2 and index.space_folder == legacy
    assert index.space == building.space_key(index.meta["model"])

    decodes.clear()
    assert _counts(build_index(MODEL, sounds, legacy, progress=False, update=True)) == (0, 2, 0) and decodes == []
    manifest = json.loads((legacy / "index.json").read_text())
    assert manifest["format_version"] == 2 and list(manifest["spaces"]) == [index.space]
    assert None not in _space_rows(legacy).column("content_hash").to_pylist()  # filled in
    (sounds / Path(CLIPS[1]).name).rename(sounds / "renamed.flac")
    assert _counts(build_index(MODEL, sounds, legacy, progress=False)) == (0, 1, 1) and decodes == []


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> str:
    """The demo model with its audio projection nudged: another model (another weights hash, other embeddings)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(MODEL, folder)
    weights = load_file(folder / "model.safetensors")
    weights["audio_projection.fc2.weight"] = weights["audio_projection.fc2.weight"] * 1.01 + 0.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def two_spaces(tmp_path_factory, other_model) -> tuple[Path, str, str]:
    """An index of three clips with the demo model's space (active) and the other model's beside it."""
    folder = tmp_path_factory.mktemp("spaces")
    sounds = _clips(folder / "sounds", CLIPS[:3])
    first = build_index(MODEL, sounds, folder / "index", progress=False)
    second = build_index(other_model, sounds, folder / "index", progress=False, add_space=True)
    assert _counts(second) == (3, 0, 0) and first.space != second.space
    return folder / "index", first.space, second.space


def test_spaces_are_added_beside_listed_activated_and_removed(two_spaces, tmp_path, capsys):
    built, first, second = two_spaces
    index = tmp_path / "index"
    shutil.copytree(built, index)
    assert SoundIndex(index).space == first  # adding a space leaves the active one active
    assert SoundIndex(index, space=second[:20]).space == second
    assert main(["index-space", str(index)]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith(f"* {first}  model {MODEL}  3 sounds") and listed[1].startswith(f"  {second}  ")

    assert main(["index-space", str(index), "--activate", first[:8]]) == 2  # the same config: both start so
    assert f"'{first[:8]}' matches several spaces in {index}: give one of {first}, {second}" in capsys.readouterr().err
    assert main(["index-space", str(index), "--activate", second[:20]]) == 0
    assert capsys.readouterr().out.startswith(f"active space of {index}: {second}\n")
    assert SoundIndex(index).space == second
    assert main(["search", str(index), "a bee buzzes", "--top-k", "1", "--json"]) == 0
    (answer,) = json.loads(capsys.readouterr().out)
    assert answer["space"] == second and len(answer["results"]) == 1

    assert main(["index-space", str(index), "--remove", second]) == 2
    assert "is the active space" in capsys.readouterr().err
    assert main(["index-space", str(index), "--remove", first, "--json"]) == 0
    assert [space["space"] for space in json.loads(capsys.readouterr().out.split("\n", 1)[1])] == [second]
    assert main(["index-space", str(index), "--activate", "ffff"]) == 2
    assert "'ffff' is not a space of it" in capsys.readouterr().err
    # A removed space's files stay while a reader may still read them: until the manifest changes again.
    assert len(list((index / "spaces").iterdir())) == 2
    build_index(building.read_index_meta(index)["model"]["name"], built.parent / "sounds", index, progress=False)
    assert {path.name.split(".")[0] for path in (index / "spaces").iterdir()} == {second}


def test_a_build_of_another_model_without_add_space_replaces_the_spaces(two_spaces, tmp_path):
    built, first, second = two_spaces
    index = tmp_path / "index"
    shutil.copytree(built, index)
    other = building.read_index_meta(index, second)["model"]["name"]
    building.remove_space(index, second)
    summary = build_index(other, built.parent / "sounds", index, progress=False)
    assert summary.space == second and _counts(summary) == (3, 0, 0)
    assert list(building.read_manifest(index)["spaces"]) == [second] and SoundIndex(index).space == second


def _set_manifest(index: Path, change) -> None:
    manifest = json.loads((index / "index.json").read_text())
    change(manifest)
    (index / "index.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda index, key: _set_manifest(index, lambda m: m.update(active="nope")), "invalid entries: active"),
        (lambda index, key: _set_manifest(index, lambda m: m.pop("spaces")), "the index folder is damaged"),
        (
            lambda index, key: _set_manifest(index, lambda m: m["spaces"][key].update(folder="../elsewhere")),
            "invalid entries: spaces",
        ),
        (
            lambda index, key: shutil.rmtree(building.open_space(index, key)[0]),
            "index.json is missing (INDEX/index.json names its space)",
        ),
    ],
)
def test_a_damaged_manifest_or_space_is_named_with_the_fix(two_spaces, tmp_path, damage, message):
    built, first, second = two_spaces
    index = tmp_path / "index"
    shutil.copytree(built, index)
    damage(index, first)
    with pytest.raises((DamagedIndexError, ValueError)) as raised:
        building.read_index_meta(index)
    text = str(raised.value)
    assert message.replace("INDEX", str(index)) in text or "not a search index" in text, text
    if isinstance(raised.value, DamagedIndexError):
        assert text.endswith(f"rebuild it with `m2d2-hf index MODEL_DIR SOURCE --output {index}` (which replaces it)")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_server_switches_spaces_without_a_failed_or_mixed_answer(two_spaces, tmp_path):
    pytest.importorskip("fastapi", reason="the web page needs the [app] extra (fastapi, uvicorn)")
    import httpx
    import uvicorn

    from m2d2_hf.search.app import create_app

    built, first, second = two_spaces
    index = tmp_path / "index"
    shutil.copytree(built, index)
    expected = {}
    for key in (first, second):
        space = SoundIndex(index, space=key)
        for query in QUERIES:
            (result,) = space.search(text=[query], top_k=3)
            expected[key, query] = result["results"]

    def same(hits: list, wanted: list) -> bool:
        return [hit["key"] for hit in hits] == [hit["key"] for hit in wanted] and all(
            abs(hit["score"] - other["score"]) < 1e-4 for hit, other in zip(hits, wanted)
        )

    # The spaces answer differently, so an answer mixing them would show.
    assert not all(same(expected[first, query], expected[second, query]) for query in QUERIES)

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(SoundIndex(index), port=port), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    token = re.search(r'<meta name="m2d2-token" content="([^"]+)">', httpx.get(base + "/").text).group(1)
    try:
        assert httpx.get(base + "/api/space").json() == {"space": first, "spaces": [first, second], "active": first}
        refused = httpx.post(base + "/api/space", json={"space": second})
        assert refused.status_code == 403 and "X-M2D2-Token" in refused.json()["detail"]
        unknown = httpx.post(base + "/api/space", json={"space": "ffff"}, headers={"X-M2D2-Token": token})
        assert unknown.status_code == 400 and f"still serving {first}" in unknown.json()["detail"]

        stop, answers = threading.Event(), []

        def client(number: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as session:
                step = 0
                while not stop.is_set() or step < 10:
                    query = QUERIES[(number + step) % len(QUERIES)]
                    response = session.get("/api/search", params={"q": query, "k": 3})
                    answers.append((query, response.status_code, response.json()))
                    step += 1

        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(client, number) for number in range(4)]
            switches = []
            for target in (second, None, second):  # None: the folder's active space, read again
                time.sleep(0.3)
                switched = httpx.post(
                    base + "/api/space", json={"space": target}, headers={"X-M2D2-Token": token}, timeout=60
                )
                switches.append((switched.status_code, switched.json()["space"]))
            time.sleep(0.3)
            stop.set()
            for future in running:
                future.result()
        assert switches == [(200, second), (200, first), (200, second)]
        assert all(status == 200 for _, status, _ in answers), [a for a in answers if a[1] != 200][:3]
        spaces = [answer["space"] for _, _, answer in answers]
        assert {first, second} <= set(spaces)
        mixed = [
            (query, answer["space"])
            for query, _, answer in answers
            if not same(answer["results"], expected[answer["space"], query])
        ]
        assert mixed == [] and len(answers) >= 40
    finally:
        server.should_exit = True
        thread.join(timeout=10)
