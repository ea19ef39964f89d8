"""The search web page of `m2d2-hf serve` (FastAPI; the `[app]` extra).

    GET  /                               the page: a query box (text, or an uploaded clip), ranked results with an
                                         audio player starting at the best-matching moment, a result's timeline
    GET  /api/search?q=...&k=10          JSON: {"query", "results": [hit, ...]} (hits as `SearchHit.to_dict` plus
                                         `audio_url` / `timeline_url`)
    POST /api/search-audio?k=10          the same for an uploaded example clip (multipart field `file`)
    GET  /api/audio/{sound_id}           the indexed file of a sound (only indexed files are served), or a dataset
                                         row's encoded audio, read from the index's source
    GET  /api/timeline/{sound_id}.png?q= the timeline plot of a sound against a text query, from its stored window
                                         embeddings (`m2d2_hf.timeline.plot_timeline`)
    POST /api/timeline/{sound_id}.png    the same against an uploaded example clip (multipart field `file`)

The server binds 127.0.0.1 only. Queries are bounded: at most `MAX_K` results, `MAX_QUERY_CHARS` characters, and
uploads of `MAX_UPLOAD_BYTES`.
"""

import os
import tempfile
from pathlib import Path

import numpy as np


MAX_K = 100
MAX_QUERY_CHARS = 500
MAX_UPLOAD_BYTES = 20 * 1024 * 1024

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>M2D2 sound search</title>
<style>
 body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
 h1 { font-size: 1.4em; } .meta { color: #666; font-size: 0.9em; }
 form { display: flex; gap: 0.5em; flex-wrap: wrap; align-items: center; margin: 1em 0; }
 #q { flex: 1; min-width: 20em; padding: 0.4em; font-size: 1em; }
 ol { padding-left: 1.5em; } li { margin: 0.6em 0; }
 .name { font-weight: bold; } .score { font-family: monospace; color: #0a5; }
 .range { color: #555; } audio { display: block; margin-top: 0.2em; height: 2em; }
 #timeline img { max-width: 100%; border: 1px solid #ddd; } #error { color: #b00; }
</style>
</head>
<body>
<h1>M2D2 sound search</h1>
<p class="meta" id="meta">__META__</p>
<form id="text-form">
 <input id="q" name="q" placeholder="describe a sound, e.g. a dog barks" maxlength="500">
 <input id="k" name="k" type="number" value="10" min="1" max="100" style="width:4em">
 <button id="go" type="submit">Search</button>
</form>
<form id="audio-form">
 <label>or search by example: <input id="clip" type="file" accept="audio/*"></label>
 <button id="go-audio" type="submit">Search by clip</button>
</form>
<p id="error"></p>
<div id="timeline"></div>
<ol id="results"></ol>
<script>
const results = document.getElementById("results"), errorBox = document.getElementById("error");
const timeline = document.getElementById("timeline");
let lastText = null, lastFile = null;
function show(data) {
  results.innerHTML = ""; timeline.innerHTML = ""; errorBox.textContent = "";
  for (const hit of data.results) {
    const li = document.createElement("li"); li.className = "hit";
    const name = document.createElement("span"); name.className = "name";
    name.textContent = hit.key.split("/").pop(); name.title = hit.key;
    const score = document.createElement("span"); score.className = "score";
    score.textContent = " " + hit.score.toFixed(3) + " ";
    const range = document.createElement("span"); range.className = "range";
    range.textContent = hit.start.toFixed(2) + "-" + hit.end.toFixed(2) + " s of " + hit.duration.toFixed(2) + " s";
    li.append(name, score, range);
    if (hit.audio_url) {
      const audio = document.createElement("audio"); audio.controls = true; audio.preload = "none";
      audio.src = hit.audio_url + "#t=" + hit.start.toFixed(2) + "," + hit.end.toFixed(2);
      li.append(audio);
    }
    const button = document.createElement("button"); button.textContent = "timeline"; button.className = "plot";
    button.onclick = () => plot(hit);
    li.append(" ", button);
    results.append(li);
  }
}
async function plot(hit) {
  // A text query is sent again as ?q=; an uploaded clip is posted again (the server keeps no state).
  timeline.innerHTML = "";
  let source = hit.timeline_url + "?q=" + encodeURIComponent(lastText);
  if (lastText === null) {
    const body = new FormData(); body.append("file", lastFile);
    const response = await fetch(hit.timeline_url, {method: "POST", body});
    if (!response.ok) { errorBox.textContent = (await response.json()).detail; return; }
    source = URL.createObjectURL(await response.blob());
  }
  const img = document.createElement("img"); img.alt = "timeline of " + hit.key; img.id = "timeline-image";
  img.src = source; timeline.append(img);
}
async function answer(response) {
  const data = await response.json();
  if (!response.ok) { errorBox.textContent = data.detail || response.statusText; results.innerHTML = ""; return; }
  show(data);
}
document.getElementById("text-form").onsubmit = async (event) => {
  event.preventDefault();
  const q = document.getElementById("q").value, k = document.getElementById("k").value;
  lastText = q;
  await answer(await fetch("/api/search?q=" + encodeURIComponent(q) + "&k=" + encodeURIComponent(k)));
};
document.getElementById("audio-form").onsubmit = async (event) => {
  event.preventDefault();
  const file = document.getElementById("clip").files[0];
  if (!file) { errorBox.textContent = "choose an audio file first"; return; }
  const body = new FormData(); body.append("file", file); lastText = null; lastFile = file;
  const k = document.getElementById("k").value;
  await answer(await fetch("/api/search-audio?k=" + encodeURIComponent(k), {method: "POST", body}));
};
</script>
</body>
</html>
"""


# Leading bytes of the encoded formats a dataset row may hold, for its media type when its name tells none.
_MAGIC_MEDIA_TYPES = ((b"RIFF", "audio/wav"), (b"fLaC", "audio/flac"), (b"OggS", "audio/ogg"), (b"ID3", "audio/mpeg"))


def _media_type(head: bytes, name: str | None) -> str:
    import mimetypes

    guessed = mimetypes.guess_type(name)[0] if name else None
    if guessed and guessed.startswith("audio/"):
        return guessed
    return next((media for magic, media in _MAGIC_MEDIA_TYPES if head.startswith(magic)), "application/octet-stream")


def require_app_extra() -> None:
    """The page's packages are an extra: say which command installs them rather than fail on an import."""
    import importlib.util

    multipart = importlib.util.find_spec("python_multipart") or importlib.util.find_spec("multipart")
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    missing += [] if multipart else ["python-multipart"]
    if missing:
        raise ImportError(
            f"the search page needs {', '.join(missing)}: pip install 'm2d2_hf[app]' (fastapi, uvicorn, "
            "python-multipart)"
        )


def create_app(index):
    """A FastAPI app serving `index` (a `SoundIndex`)."""
    import html

    require_app_extra()

    from fastapi import FastAPI, File, HTTPException, Query, UploadFile
    from fastapi.responses import FileResponse, HTMLResponse, Response

    from ..data.audio import AudioDecodeError, decode_audio
    from ..timeline import Timeline, plot_timeline

    app = FastAPI(title="M2D2 sound search")
    meta = index.meta
    page = PAGE.replace(
        "__META__",
        html.escape(
            f"{len(index)} sounds, {meta['audio_hours']:.2f} h, {meta['num_vectors']} vectors "
            f"({meta['faiss']['type']}); model {Path(meta['model']['name']).name}"
        ),
    )

    reopen = meta.get("reopen")  # absent for indexes of in-memory datasets (and for older indexes)
    dataset_rows: dict[str, object] = {}

    def dataset_audio(sound_id: int) -> tuple[bytes, str]:
        """The encoded audio of a dataset row, read from the index's source, and its media type."""
        if reopen is None:
            raise HTTPException(404, f"sound {sound_id} comes from an in-memory dataset: there is no file to play")
        if not dataset_rows:
            from .sources import list_source

            try:
                items = list_source(reopen["source"], split=reopen["split"], audio_column=reopen["audio_column"])
            except (ValueError, OSError, ImportError) as error:
                raise HTTPException(404, f"cannot open the index's source {reopen['source']}: {error}") from None
            dataset_rows.update((item.key, item) for item in items)
        item = dataset_rows.get(index.sound_keys[sound_id])
        value = None if item is None else item.audio_value()
        data = value.get("bytes") if isinstance(value, dict) else None
        name = value.get("path") if isinstance(value, dict) else None
        if data is None and name and os.path.isfile(name):
            data = Path(name).read_bytes()
        if not data:
            raise HTTPException(404, f"sound {sound_id} is no longer in {reopen['source']}")
        return bytes(data), _media_type(bytes(data[:12]), name)

    def with_urls(hits: list[dict]) -> list[dict]:
        for hit in hits:
            hit["audio_url"] = f"/api/audio/{hit['sound_id']}" if hit["path"] or reopen else None
            hit["timeline_url"] = f"/api/timeline/{hit['sound_id']}.png"
        return hits

    def sound(sound_id: int) -> int:
        if not 0 <= sound_id < len(index):
            raise HTTPException(404, f"no sound {sound_id}: the index has sounds 0 to {len(index) - 1}")
        return sound_id

    def checked_text(q: str) -> str:
        if not q.strip():
            raise HTTPException(400, "empty query: type a description of a sound")
        return q

    @app.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @app.get("/api/search")
    def search(q: str = Query(..., max_length=MAX_QUERY_CHARS), k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        (result,) = index.search(text=[checked_text(q)], top_k=k)
        return {"query": q, "results": with_urls(result["results"])}

    @app.post("/api/search-audio")
    def search_audio(file: UploadFile = File(...), k: int = Query(10, ge=1, le=MAX_K)) -> dict:
        (hits,) = index.search_embeddings(uploaded_embedding(file), top_k=k)
        return {"query": f"audio:{file.filename}", "results": with_urls([hit.to_dict() for hit in hits])}

    @app.get("/api/audio/{sound_id}")
    def audio(sound_id: int) -> Response:
        path = index.sound_paths[sound(sound_id)]
        if path is None:  # a dataset row: its audio from the dataset
            data, media_type = dataset_audio(sound_id)
            return Response(data, media_type=media_type)
        if not os.path.isfile(path):
            raise HTTPException(404, f"sound {sound_id} has no local file to play")
        return FileResponse(path)

    def uploaded_embedding(file: UploadFile) -> np.ndarray:
        data = file.file.read(MAX_UPLOAD_BYTES + 1)
        if len(data) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"the clip is larger than {MAX_UPLOAD_BYTES // 2**20} MB")
        try:
            return index.embed_audio(data)
        except AudioDecodeError as error:
            raise HTTPException(400, f"cannot decode the uploaded clip: {error}") from None

    def timeline_of(sound_id: int, label: str, query: np.ndarray) -> Response:
        """The PNG of one (checked) sound's window similarities to `query` [D], over its waveform and log-mel."""
        path = index.sound_paths[sound_id]
        name = path or index.sound_keys[sound_id]
        times, similarities = index.window_similarities(sound_id, query)
        try:
            encoded = path if path is not None else dataset_audio(sound_id)[0]
            wave = decode_audio(encoded, sampling_rate=index.rate, max_seconds=None)
        except AudioDecodeError as error:
            raise HTTPException(404, f"cannot decode {name}: {error}") from None
        plotted = Timeline(
            [label], times, similarities[None].astype(np.float32), meta["window_seconds"], meta["hop_seconds"]
        )
        with tempfile.TemporaryDirectory() as folder:
            png = plot_timeline(plotted, wave, index.rate, Path(folder) / "timeline.png", title=Path(name).name)
            return Response(png.read_bytes(), media_type="image/png")

    @app.get("/api/timeline/{sound_id}.png")
    def timeline_png(sound_id: int, q: str = Query(..., max_length=MAX_QUERY_CHARS)) -> Response:
        sound(sound_id)
        return timeline_of(sound_id, q, index.embed_text([checked_text(q)])[0])

    @app.post("/api/timeline/{sound_id}.png")
    def timeline_audio_png(sound_id: int, file: UploadFile = File(...)) -> Response:
        sound(sound_id)
        return timeline_of(sound_id, f"like {file.filename}", uploaded_embedding(file)[0])

    return app


def serve(index_dir: str | os.PathLike, port: int = 7860, model: str | None = None) -> None:
    """Runs the page for the index folder on http://127.0.0.1:`port`/ until interrupted."""
    require_app_extra()
    import uvicorn

    from .api import SoundIndex

    uvicorn.run(create_app(SoundIndex(index_dir, model=model)), host="127.0.0.1", port=port, log_level="warning")


__all__ = ["create_app", "require_app_extra", "serve"]
