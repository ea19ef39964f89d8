"""The search web page of `m2d2-hf serve` (FastAPI; the `[app]` extra).

    GET  /                               the page: a query box (text, or an uploaded clip), ranked results with an
                                         audio player starting at the best-matching moment, a result's timeline
    GET  /api/search?q=...&k=10          JSON: {"query", "results": [hit, ...]} (hits as `SearchHit.to_dict` plus
                                         `audio_url` / `timeline_url`); also `offset`, `where` (a metadata filter,
                                         `filters`), `hybrid=true` (BM25 fused in), `dedup` (a cosine threshold)
    POST /api/search-audio?k=10          the same for an uploaded example clip (multipart field `file`; every POST
                                         carries the page's token as `X-M2D2-Token`)
    GET  /api/audio/{sound_id}           the indexed file of a sound (only indexed files are served), or a dataset
                                         row's encoded audio, read from the index's source
    GET  /api/timeline/{sound_id}.png?q= the timeline plot of a sound against a text query, from its stored window
                                         embeddings (`m2d2_hf.timeline.plot_timeline`)
    POST /api/timeline/{sound_id}.png    the same against an uploaded example clip (multipart field `file`)
    GET  /api/space                      JSON: {"space": the embedding space served, "spaces": the index's spaces,
                                         "active": the one its manifest names}
    POST /api/space                      JSON body {"space": KEY} (or none: the index's active space, read again):
                                         serve that space from now on, once it is loaded (`SpaceSwitch.activate`)

Every search answer names the space it was computed in (`space`). A switch builds the new space's app whole (index
read, model loaded) while the current one keeps answering, then replaces one reference: each request is answered,
from start to end, by the space that was current when it arrived (its query embedded by that space's model).

What the server trusts, for a team to leave it running on a shared machine:

- It binds 127.0.0.1 only, and answers only requests addressed to it by that name: a Host header other than
  127.0.0.1:PORT or localhost:PORT is refused (403), so a site whose name is rebound to 127.0.0.1 (DNS rebinding)
  reads nothing.
- It trusts its own origin: POSTs, and the GETs that compute (search, timeline), are refused (403) when their
  Origin is another one or the browser says they come from another site (Sec-Fetch-Site), and every POST needs the
  per-process random token that the page embeds (`<meta name="m2d2-token">`) and sends as `X-M2D2-Token`. A page of
  another site can therefore neither post a clip nor run searches; a script posts with the token read from the page.
  This guards against browsers, not people: anyone with a shell on the machine can reach 127.0.0.1.
- Uploads are bounded by what they decode to (`AudioLimits`, settable: 60 s, 2 channels, 96 kHz by default, read
  from the header before decoding) and by their size (`MAX_UPLOAD_BYTES`), refused with 413; undecodable ones,
  bad headers and samples too loud for the feature extractor with 400. At most `UPLOAD_DECODES` decode at once.
- Only indexed files are served, and only while they are the files that were indexed: the path must still resolve
  to itself (no symbolic link put in its place or above it) and its size and modification time must match the
  index's stamp, else 404 (gone) or 409 (changed).
- Every error is one line of JSON, `{"detail": "..."}`; an unexpected failure is a 500 whose traceback stays in the
  server's log.

Queries are bounded too: at most `MAX_K` results from at most `MAX_OFFSET` on, `MAX_QUERY_CHARS` characters of query
and of filter.
"""

import os
import secrets
import stat
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from ..data.audio import AudioDecodeError, AudioLimits, AudioTooLargeError, decode_audio, decode_within
from .filters import FilterError, matching_rows
from .sources import stat_stamp


# A page of 1000 ranks in tens of milliseconds on the flat index; deeper lists are paged with `offset`.
MAX_K, MAX_OFFSET = 1000, 10_000
MAX_QUERY_CHARS = 500
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# A multipart body holds the file and a few hundred bytes of part headers and boundaries.
_MULTIPART_OVERHEAD = 64 * 1024
# Each upload being decoded holds its bytes and its samples while they are mixed down and resampled (about 140 MB at
# the default limits); the model embeds one clip at a time anyway, so more at once would only add memory.
UPLOAD_DECODES = 4
TOKEN_HEADER = "X-M2D2-Token"
# GET routes that run the model or draw a plot: refused from other origins like the POSTs.
_COMPUTING_PATHS = ("/api/search", "/api/timeline/")
_REFUSE_FIX = "rebuild or update the index (`m2d2-hf index` again)"

if TYPE_CHECKING:
    from fastapi import FastAPI

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="m2d2-token" content="__TOKEN__">
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
 <input id="k" name="k" type="number" value="10" min="1" max="1000" style="width:4em">
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
// Every POST carries the token this page was served with: the server refuses posts that lack it.
const tokenHeaders = {"X-M2D2-Token": document.querySelector('meta[name="m2d2-token"]').content};
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
    const response = await fetch(hit.timeline_url, {method: "POST", body, headers: tokenHeaders});
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
  const url = "/api/search-audio?k=" + encodeURIComponent(document.getElementById("k").value);
  await answer(await fetch(url, {method: "POST", body, headers: tokenHeaders}));
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


class _OwnPageOnly:
    """ASGI middleware that refuses, before any route runs, what a page of another site could make the user's
    browser send (see the module docstring): another Host, another origin on the POSTs and computing GETs, a POST
    without the page's token, and upload bodies over the size limit or of no stated length."""

    def __init__(self, app, port: int, token: str, max_body_bytes: int):
        self.app, self.port, self.token, self.max_body_bytes = app, port, token.encode(), max_body_bytes
        names = ("127.0.0.1", "localhost")
        self.hosts = {f"{name}:{port}" for name in names} | (set(names) if port == 80 else set())
        self.origins = {f"http://{host}" for host in self.hosts}

    def refusal(self, scope) -> tuple[int, str] | None:
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        own = f"http://127.0.0.1:{self.port}"
        host = headers.get("host", "")
        if host.lower() not in self.hosts:
            return 403, f"Host {host!r} is not this server's address: open {own}/ (other names are refused)"
        unsafe = scope["method"] not in ("GET", "HEAD", "OPTIONS")
        if not unsafe and not scope["path"].startswith(_COMPUTING_PATHS):
            return None
        origin = headers.get("origin")
        if origin is not None and origin.lower() not in self.origins:
            return 403, f"requests from {origin} are refused: only the page at {own}/ may search this index"
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return 403, f"a {site} request is refused: only the page at {own}/ may search this index"
        if not unsafe:
            return None
        if not secrets.compare_digest(headers.get(TOKEN_HEADER.lower(), "").encode("latin-1"), self.token):
            return 403, (
                f"missing or wrong {TOKEN_HEADER} header: post from the page at {own}/, or send the token its "
                '<meta name="m2d2-token"> holds'
            )
        length = headers.get("content-length")
        if length is None:
            if "transfer-encoding" in headers:
                return 411, "an upload needs a Content-Length header (chunked bodies are refused)"
        elif not length.isdigit():
            return 400, f"Content-Length {length!r} is not a number of bytes"
        elif int(length) > self.max_body_bytes + _MULTIPART_OVERHEAD:
            return (
                413,
                f"the request body is {int(length) / 2**20:.1f} MB, above the upload limit of "
                f"{self.max_body_bytes / 2**20:g} MB",
            )
        return None

    async def __call__(self, scope, receive, send) -> None:
        refused = self.refusal(scope) if scope["type"] == "http" else None
        if refused is None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        status, reason = refused
        await JSONResponse({"detail": reason}, status_code=status)(scope, receive, send)


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


class SpaceSwitch:
    """The ASGI app of the page: requests pass `_OwnPageOnly`, then go whole to the app of the space current when
    they arrive (one read of one reference). What the spaces' apps share lives here: the token, the upload limits,
    and the bounds on decoding and plotting at once."""

    def __init__(self, index, port: int, limits: AudioLimits, max_upload_bytes: int):
        self.token = secrets.token_urlsafe(32)
        self.state = SimpleNamespace(token=self.token)
        self.limits, self.max_upload_bytes = limits, max_upload_bytes
        self.decoding = threading.BoundedSemaphore(UPLOAD_DECODES)
        self.plotting = threading.Lock()  # one timeline at a time: pyplot keeps global state, a sound decodes whole
        self._switching = threading.Lock()
        self.index, self.current = index, _space_app(index, self)
        self._guarded = _OwnPageOnly(self._dispatch, port=port, token=self.token, max_body_bytes=max_upload_bytes)

    async def _dispatch(self, scope, receive, send) -> None:
        await self.current(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        await self._guarded(scope, receive, send)

    def activate(self, space: str | None = None) -> tuple[str, str]:
        """Serves the space `space` (a key or the start of one) of the served index folder, default the folder's
        active space as its manifest now says; returns (previous, new) keys. The new space's index and model are
        loaded, and its app built, before the one reference changes; one switch at a time."""
        from .api import SoundIndex

        with self._switching:
            previous = self.index
            device = next(previous.model.parameters()).device
            index = SoundIndex(previous.folder, device=device, space=space)
            self.index, self.current = index, _space_app(index, self)
        return previous.space, index.space


def create_app(
    index, *, port: int = 7860, limits: AudioLimits | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES
) -> SpaceSwitch:
    """The app (a `SpaceSwitch`) serving `index` (a `SoundIndex`) at http://127.0.0.1:`port`/ (the port its Host and
    Origin checks expect), taking uploads within `limits` (default `AudioLimits()`) and `max_upload_bytes`. Its token
    is `app.state.token`."""
    require_app_extra()
    return SpaceSwitch(index, port, limits or AudioLimits(), max_upload_bytes)


def _space_app(index, switch: SpaceSwitch) -> "FastAPI":
    """The FastAPI app of the page over one space: every request it answers uses `index` only."""
    import html

    from fastapi import Body, FastAPI, File, HTTPException, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool

    from ..timeline import Timeline, plot_timeline
    from .building import DamagedIndexError, read_manifest

    token, limits, max_upload_bytes = switch.token, switch.limits, switch.max_upload_bytes
    app = FastAPI(title="M2D2 sound search")

    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        # FastAPI answers a list of objects; the page shows `detail` as one line.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'][1:]) or 'request'}: {problem['msg']}"
            for problem in error.errors()
        )
        return JSONResponse({"detail": f"invalid request: {problems}"}, status_code=422)

    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        # Starlette raises the error again once this answer is sent, so that the server logs its traceback.
        return JSONResponse(
            {"detail": f"internal error ({type(error).__name__}): the server's log has the details"}, status_code=500
        )

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, internal_error)

    meta = index.meta
    page = PAGE.replace(
        "__META__",
        html.escape(
            f"{len(index)} sounds, {meta['audio_hours']:.2f} h, {meta['num_vectors']} vectors "
            f"({meta['faiss']['type']}); model {Path(meta['model']['name']).name}"
        ),
    ).replace("__TOKEN__", token)
    stamps = index.sound_stamps()
    decoding, plotting = switch.decoding, switch.plotting

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

    def indexed_file(sound_id: int) -> os.stat_result:
        """The status of a sound's file while it is the file that was indexed: its path still resolves to itself
        (no symbolic link put in its place or above it) and its size and mtime match the index's stamp."""
        path = index.sound_paths[sound_id]
        try:
            status = os.stat(path)
        except OSError:
            raise HTTPException(404, f"sound {sound_id} is gone: {path} was moved or deleted; {_REFUSE_FIX}") from None
        if os.path.realpath(path) != path:
            raise HTTPException(
                409, f"sound {sound_id}: {path} now leads elsewhere through a symbolic link; {_REFUSE_FIX}"
            )
        if not stat.S_ISREG(status.st_mode):
            raise HTTPException(409, f"sound {sound_id}: {path} is no longer a regular file; {_REFUSE_FIX}")
        if stamps[sound_id] is not None and stat_stamp(status) != stamps[sound_id]:
            raise HTTPException(
                409,
                f"sound {sound_id}: {path} changed since it was indexed (size or modification time); {_REFUSE_FIX}",
            )
        return status

    # The page and the players are async routes: they answer on the event loop while every thread of the pool
    # waits for the model.
    @app.get("/", response_class=HTMLResponse)
    async def home() -> str:
        return page

    def filtered(run):
        """`run()`'s answer; a filter that does not parse (or names no column of the index) is the client's 400."""
        try:
            return run()
        except FilterError as error:
            raise HTTPException(400, str(error)) from None

    @app.get("/api/search")
    def search(
        q: str = Query(..., max_length=MAX_QUERY_CHARS),
        k: int = Query(10, ge=1, le=MAX_K),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        where: str | None = Query(None, max_length=MAX_QUERY_CHARS),
        hybrid: bool = False,
        dedup: float | None = Query(None, gt=0, le=1),
    ) -> dict:
        options = {"top_k": k, "offset": offset, "where": where, "hybrid": hybrid, "dedup": dedup}
        (result,) = filtered(lambda: index.search(text=[checked_text(q)], **options))
        return {"query": q, "space": index.space, "results": with_urls(result["results"])}

    @app.post("/api/search-audio")
    def search_audio(
        file: UploadFile = File(...),
        k: int = Query(10, ge=1, le=MAX_K),
        offset: int = Query(0, ge=0, le=MAX_OFFSET),
        where: str | None = Query(None, max_length=MAX_QUERY_CHARS),
        dedup: float | None = Query(None, gt=0, le=1),
    ) -> dict:
        if where is not None:  # a bad filter is refused before the upload is decoded
            filtered(lambda: matching_rows(index.sound_table(), where))
        query = uploaded_embedding(file)
        options = {"top_k": k, "offset": offset, "where": where, "dedup": dedup}
        (hits,) = filtered(lambda: index.search_embeddings(query, **options))
        return {
            "query": f"audio:{file.filename}",
            "space": index.space,
            "results": with_urls([hit.to_dict() for hit in hits]),
        }

    @app.get("/api/space")
    def space_info() -> dict:
        try:
            manifest = read_manifest(index.folder)
        except ValueError as error:  # the folder changed under the server: say so, keep serving
            raise HTTPException(409, str(error)) from None
        return {"space": index.space, "spaces": list(manifest["spaces"]), "active": manifest["active"]}

    @app.post("/api/space")
    def switch_space(space: str | None = Body(None, embed=True, max_length=200)) -> dict:
        try:
            previous, current = switch.activate(space)
        except DamagedIndexError as error:
            raise HTTPException(409, f"cannot serve that space, still serving {index.space}: {error}") from None
        except (ValueError, OSError) as error:  # no such space, another model, a model folder gone
            raise HTTPException(400, f"cannot serve that space, still serving {index.space}: {error}") from None
        return {"space": current, "previous": previous, "sounds": len(switch.index)}

    @app.get("/api/audio/{sound_id}")
    async def audio(sound_id: int) -> Response:
        path = index.sound_paths[sound(sound_id)]
        if path is None:  # a dataset row: its audio from the dataset
            data, media_type = await run_in_threadpool(dataset_audio, sound_id)
            return Response(data, media_type=media_type)
        # The checks are a few system calls; FileResponse answers Range requests (players seek) from the checked
        # status, and opens the path right after them.
        return FileResponse(path, stat_result=indexed_file(sound_id))

    def uploaded_embedding(file: UploadFile) -> np.ndarray:
        with decoding:
            data = file.file.read(max_upload_bytes + 1)
            if len(data) > max_upload_bytes:
                raise HTTPException(
                    413,
                    f"the clip is larger than {max_upload_bytes / 2**20:g} MB: send a smaller one, or start the "
                    "server with a higher --max-upload-mb",
                )
            try:
                wave = decode_within(data, limits, index.rate)
            except AudioTooLargeError as error:
                raise HTTPException(
                    413,
                    f"the clip is too large to decode here ({error}): send a shorter mono or stereo clip, or "
                    "start the server with higher --max-upload-seconds / --max-upload-channels / --max-upload-rate",
                ) from None
            except AudioDecodeError as error:
                raise HTTPException(400, f"cannot decode the uploaded clip: {error}") from None
        try:
            return index.embed_audio(wave, sampling_rate=index.rate)
        except ValueError as error:  # the feature extractor refuses samples too loud for float32 spectra (max_peak)
            raise HTTPException(400, f"cannot embed the uploaded clip: {error}") from None

    def timeline_of(sound_id: int, label: str, query: np.ndarray) -> Response:
        """The PNG of one (checked) sound's window similarities to `query` [D], over its waveform and log-mel."""
        path = index.sound_paths[sound_id]
        name = path or index.sound_keys[sound_id]
        times, similarities = index.window_similarities(sound_id, query)
        plotted = Timeline(
            [label], times, similarities[None].astype(np.float32), meta["window_seconds"], meta["hop_seconds"]
        )
        with plotting:
            if path is not None:
                indexed_file(sound_id)
            try:
                encoded = path if path is not None else dataset_audio(sound_id)[0]
                wave = decode_audio(encoded, sampling_rate=index.rate, max_seconds=None)
            except AudioDecodeError as error:
                raise HTTPException(404, f"cannot decode {name}: {error}") from None
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


def serve(
    index_dir: str | os.PathLike,
    port: int = 7860,
    model: str | None = None,
    limits: AudioLimits | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
) -> None:
    """Runs the page for the index folder on http://127.0.0.1:`port`/ until interrupted, taking uploads within
    `limits` (default `AudioLimits()`) and `max_upload_bytes`."""
    require_app_extra()
    import uvicorn

    from .api import SoundIndex

    app = create_app(SoundIndex(index_dir, model=model), port=port, limits=limits, max_upload_bytes=max_upload_bytes)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


__all__ = ["create_app", "require_app_extra", "serve"]
