"""Sound search (`m2d2_hf.search`): indexing throughput and peak memory, search latency and recall, text→audio
retrieval.

1. `build_index` with the demo model (examples/demo_model) in a fresh process each: the real clips
   (../shared/data/real_sounds, an audiofolder with metadata.csv), then one 1-hour recording made by concatenating
   them. Throughput as audio hours per hour (= x real time) and clips/s; peak RSS against the RSS of the same
   process after its imports and one model load.
2. FAISS search latency over 10^5 and 10^6 synthetic L2-normalised vectors of the model's embedding size
   (clustered: 2,000 random centres plus noise, as embeddings of real sounds cluster; queries are perturbed indexed
   vectors): exact (`flat`) against IVF and HNSW built by the package's `build_vector_index` with its default
   parameters, one query at a time and all (--queries, 100) at once, with recall@10 against exact; plus one
   `SoundIndex` text query end to end (text tower + search) on the real-clip index.
3. Text→audio R@1 / R@5 of the captions of real_sounds against their clips on the demo model, against chance, for
   the clips the demo model was trained on (split train) and the held-out ones (split test).

With --hybrid-retrieval, instead: the captions → clips R@1 / R@5 of 3. for the held-out clips (split test), dense
only against hybrid ranking (reciprocal-rank fusion with BM25) over the file names only, over names and the
metadata's text columns without the captions, and over everything including the captions (the query is then one of
the indexed texts: an upper bound, not a fair test), all on the whole index (every clip a candidate).

With --serve-load, instead: `m2d2-hf serve` of the real-clip index in a subprocess on a free 127.0.0.1 port (all
traffic stays on 127.0.0.1), --clients concurrent clients (threads, one httpx client each, started together), each
sending --requests-per-client requests in turn of three kinds: a text query, an uploaded clip, and a 64 KiB range of
a result's audio; latency p50 / p99 / max per kind, the answers' status codes and the server's RSS. Then uploads
that are small as files but large as audio (5 minutes of 8-channel 96 kHz silence as FLAC, an hour of 16 kHz
silence as FLAC, a WAV at 16001 Hz), each with its answer, its time and the server's peak RSS after it.

    python benchmarks/bench_search.py [--data ../shared/data/real_sounds] [--model examples/demo_model]
        [--minutes 60] [--sizes 100000 1000000] [--skip-hour]
    python benchmarks/bench_search.py --serve-load [--clients 50] [--requests-per-client 12] [--index INDEX_DIR]
    python benchmarks/bench_search.py --hybrid-retrieval [--index INDEX_DIR]
    python benchmarks/bench_search.py --lifecycle [--initial 200 --renamed 20 --deleted 10 --queries 100]
    python benchmarks/bench_search.py --swap [--swap-queries 500 --swaps 6 --swap-clients 8]

--lifecycle and --swap (updates, renames, deletions; switching the embedding space of a served index) are described
in bench_search_lifecycle.py.
"""

import argparse
import csv
import io
import json
import math
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_search_lifecycle
import numpy as np
from common import describe_machine, interleaved_seconds, load_average, peak_rss_bytes


ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def index_worker(model: str, source: str, output: str) -> None:
    """Runs in a fresh process: RSS after imports and one model load, then `build_index`; prints one JSON line."""
    import m2d2_hf.search  # noqa: F401 - the imports a real run pays
    from m2d2_hf.search import build_index
    from m2d2_hf.search.embedding import load_clap_model

    load_clap_model(model)
    baseline = peak_rss_bytes()
    summary = build_index(model, source, output, progress=False, log=lambda line: None)
    result = {
        "seconds": summary.seconds,
        "audio_seconds": summary.audio_seconds,
        "num_files": summary.num_files,
        "num_vectors": summary.num_vectors,
        "failed": len(summary.failed),
        "baseline_rss": baseline,
        "peak_rss": peak_rss_bytes(),
    }
    print(json.dumps(result))


def run_index(model: str, source: Path, output: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--index-worker", model, str(source), str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the index worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_index(name: str, result: dict) -> None:
    seconds, audio = result["seconds"], result["audio_seconds"]
    print(
        f"  {name}: {result['num_files']} sounds, {audio / 3600:.3f} h of audio, {result['num_vectors']} vectors, "
        f"{result['failed']} failed: {seconds:.1f} s = {audio / seconds:.1f} audio hours per hour (x real time), "
        f"{result['num_files'] / seconds:.2f} clips/s; peak RSS {result['peak_rss'] / MB:.0f} MB against "
        f"{result['baseline_rss'] / MB:.0f} MB after imports + model load "
        f"(+{(result['peak_rss'] - result['baseline_rss']) / MB:.0f} MB)"
    )


def one_hour_recording(data: Path, minutes: float, path: Path) -> float:
    """Concatenates the real clips (in metadata order, cycling) up to `minutes`; writes 16 kHz mono FLAC."""
    import soundfile as sf

    from m2d2_hf.training.data import decode_audio

    with open(data / "metadata.csv", newline="") as handle:
        names = [row["file_name"] for row in csv.DictReader(handle)]
    waves = [decode_audio(str(data / name), sampling_rate=16000, max_seconds=None) for name in names]
    target = int(minutes * 60 * 16000)
    with sf.SoundFile(path, "w", samplerate=16000, channels=1, format="FLAC", subtype="PCM_16") as handle:
        written = 0
        for number in range(10**6):
            wave = waves[number % len(waves)][: target - written]
            peak = float(np.abs(wave).max()) if len(wave) else 0.0
            handle.write(wave / max(peak, 1.0))  # PCM_16 clips beyond ±1
            written += len(wave)
            if written >= target:
                break
    return written / 16000


def clustered_vectors(count: int, dim: int, seed: int, centres: int = 2000, noise: float = 0.7) -> np.ndarray:
    """`count` L2-normalised float32 vectors around `centres` random directions, made in blocks."""
    rng = np.random.default_rng(seed)
    middle = rng.standard_normal((centres, dim)).astype(np.float32) / math.sqrt(dim)
    out = np.empty((count, dim), dtype=np.float32)
    for first in range(0, count, 100_000):
        block = out[first : first + 100_000]
        block[:] = middle[rng.integers(0, centres, len(block))]
        block += noise * rng.standard_normal(block.shape, dtype=np.float32) / math.sqrt(dim)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def latency_ms(index, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    """(median ms of one query searched alone, ms per query of all of them in one call)."""
    singles = []
    for query in queries:
        start = time.perf_counter()
        index.search(query[None], k)
        singles.append(time.perf_counter() - start)
    start = time.perf_counter()
    index.search(queries, k)
    batched = (time.perf_counter() - start) / len(queries)
    return statistics.median(singles) * 1e3, batched * 1e3


def bench_latency(size: int, dim: int, num_queries: int) -> None:
    import faiss

    from m2d2_hf.search.vector_index import build_vector_index, resolved_params

    vectors = clustered_vectors(size, dim, seed=size)
    rng = np.random.default_rng(1)
    queries = vectors[rng.choice(size, num_queries, replace=False)]
    queries = queries + 0.3 * rng.standard_normal(queries.shape, dtype=np.float32) / math.sqrt(dim)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    print(
        f"  {size:,} vectors x {dim} ({vectors.nbytes / MB:.0f} MB), {num_queries} held-out queries, "
        f"FAISS {faiss.__version__} on {faiss.omp_get_max_threads()} threads:"
    )
    truth = None
    exact_single = exact_batched = None
    for kind in ("flat", "ivf", "hnsw"):
        start = time.perf_counter()
        index = build_vector_index(vectors, kind)
        build = time.perf_counter() - start
        single, batched = latency_ms(index, queries)
        _, found = index.search(queries, 10)
        if truth is None:
            truth, exact_single, exact_batched = found, single, batched
        recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
        speed = "" if kind == "flat" else f" = {exact_single / single:.1f}x / {exact_batched / batched:.1f}x exact"
        print(
            f"    {kind:<4} {json.dumps(resolved_params(kind, size))}: built in {build:.1f} s; one query "
            f"{single:.2f} ms, {len(queries)} at once {batched:.3f} ms/query{speed}; "
            f"recall@10 against exact {recall:.4f}"
        )
        del index


def caption_clips(data: Path) -> tuple[list[dict], dict[str, set[str]]]:
    """The rows of `data`'s metadata.csv, and each caption's clips (resolved paths: the index's keys)."""
    with open(data / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    clips_of = defaultdict(set)
    for row in rows:
        clips_of[row["caption"]].add(str((data / row["file_name"]).resolve()))
    return rows, clips_of


def retrieval(index_dir: Path, data: Path) -> None:
    from m2d2_hf.search import SoundIndex

    index = SoundIndex(index_dir)
    rows, clips_of = caption_clips(data)
    total = len(index)
    query = index.embed_text(["a dog barks"])
    seconds = interleaved_seconds(
        {
            "end to end": lambda: index.search(text=["a dog barks"], top_k=10),
            "search": lambda: index.search_embeddings(query, 10),
        },
        repeats=9,
    )
    end_to_end, search_only = seconds["end to end"] * 1e3, seconds["search"] * 1e3
    print(
        f"  one text query end to end on the {total}-sound index (median of 9): {end_to_end:.1f} ms, of which the "
        f"search (FAISS + per-sound ranking) {search_only:.2f} ms ({search_only / end_to_end:.1%})"
    )
    for split in ("train", "test"):
        captions = sorted({row["caption"] for row in rows if row["split"] == split})
        print(
            f"  {split} captions ({len(captions)} distinct; a hit is any clip with that caption, {total} "
            f"candidates): {caption_recall(index, captions, clips_of)}"
        )


def caption_recall(index, captions: list[str], clips_of: dict, **options) -> str:
    """R@1 and R@5 of `captions` against their clips (a hit: any clip with that caption among the top k), against
    chance, searched with `options` (`SoundIndex.search`'s)."""
    total = len(index)
    results = index.search(text=captions, top_k=5, **options)
    hits = {k: 0 for k in (1, 5)}
    chance = {k: 0.0 for k in (1, 5)}
    for caption, result in zip(captions, results):
        keys = [hit["key"] for hit in result["results"]]
        relevant = clips_of[caption]
        for k in hits:
            hits[k] += any(key in relevant for key in keys[:k])
            # chance that k random distinct sounds include one of the relevant ones
            chance[k] += 1 - math.comb(total - len(relevant), k) / math.comb(total, k)
    n = len(captions)
    return (
        f"R@1 {hits[1] / n:.3f} (chance {chance[1] / n:.3f}, {hits[1] / chance[1]:.1f}x), "
        f"R@5 {hits[5] / n:.3f} (chance {chance[5] / n:.3f}, {hits[5] / chance[5]:.1f}x)"
    )


def hybrid_retrieval(index_dir: Path, data: Path) -> None:
    """Captions → held-out clips, dense only against hybrid ranking over three choices of keyword text."""
    from m2d2_hf.search import SoundIndex

    index = SoundIndex(index_dir)
    rows, clips_of = caption_clips(data)
    captions = sorted({row["caption"] for row in rows if row["split"] == "test"})
    held_out = sum(row["split"] == "test" for row in rows)
    text_columns = index.keyword_columns()
    print(
        f"  {len(captions)} distinct captions of the {held_out} held-out clips (split test), {len(index)} candidates; "
        f"text columns of the metadata: {', '.join(text_columns)}"
    )
    no_captions = [name for name in text_columns if name != "caption"]
    for name, options in (
        ("dense only", {}),
        ("hybrid, file names", {"hybrid": True, "keyword_columns": ["name"]}),
        (f"hybrid, {' + '.join(no_captions)}", {"hybrid": True, "keyword_columns": no_captions}),
        ("hybrid, all text incl. captions (the query is indexed: upper bound)", {"hybrid": True}),
    ):
        started = time.perf_counter()
        recall = caption_recall(index, captions, clips_of, **options)
        print(f"  {name}: {recall}; {(time.perf_counter() - started) / len(captions) * 1e3:.1f} ms per query")


LOAD_KINDS = ("text query", "upload", "audio range")
LOAD_QUERIES = ("a dog barks", "a bell rings", "rain on a roof", "a bird sings", "someone speaks", "a car engine")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_memory_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MB, from /proc (0, 0 where there is none)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle)
    except OSError:
        return 0.0, 0.0
    return tuple(int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM"))


def start_server(index_dir: Path, port: int, log: Path) -> subprocess.Popen:
    """`m2d2-hf serve` in a subprocess, once its page answers (bounded wait)."""
    import httpx

    command = [sys.executable, "-m", "m2d2_hf.cli", "serve", str(index_dir), "--port", str(port)]
    with open(log, "wb") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    for _ in range(600):
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError("the server did not answer within 5 minutes")


def flac_of_silence(seconds: float, channels: int, rate: int) -> bytes:
    """FLAC of silence, written a second at a time (the samples are never held whole)."""
    import soundfile as sf

    buffer = io.BytesIO()
    block = np.zeros((rate, channels), np.int16)
    with sf.SoundFile(buffer, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as handle:
        for _ in range(int(seconds)):
            handle.write(block)
    return buffer.getvalue()


def run_load(base: str, token: str, clip: bytes, audio_urls: list[str], clients: int, per_client: int) -> tuple:
    """Per kind, the latencies (s) and status codes of `clients` concurrent sessions of `per_client` requests."""
    import httpx

    start = threading.Barrier(clients)

    def session(number: int) -> list[tuple[str, int, float]]:
        answers = []
        with httpx.Client(base_url=base, timeout=600) as client:
            start.wait()
            for step in range(per_client):
                kind = LOAD_KINDS[(number + step) % len(LOAD_KINDS)]
                began = time.perf_counter()
                try:
                    if kind == "text query":
                        query = LOAD_QUERIES[(number + step) % len(LOAD_QUERIES)]
                        response = client.get("/api/search", params={"q": query, "k": 10})
                    elif kind == "upload":
                        files = {"file": ("clip.flac", clip)}
                        response = client.post("/api/search-audio", files=files, headers={"X-M2D2-Token": token})
                    else:
                        url = audio_urls[(number + step) % len(audio_urls)]
                        response = client.get(url, headers={"range": "bytes=0-65535"})
                    status = response.status_code
                except httpx.HTTPError:
                    status = 0  # no answer: refused connection, reset or timeout
                answers.append((kind, status, time.perf_counter() - began))
        return answers

    with ThreadPoolExecutor(clients) as pool:
        sessions = list(pool.map(session, range(clients)))
    latencies, statuses = defaultdict(list), Counter()
    for kind, status, seconds in (answer for answers in sessions for answer in answers):
        latencies[kind].append(seconds)
        statuses[kind, status] += 1
    return latencies, statuses


def serve_load(args: argparse.Namespace, work: Path) -> None:
    import httpx
    import soundfile as sf

    index_dir = args.index
    if index_dir is None:
        index_dir = work / "real_index"
        print_index(f"index of the real clips ({args.data.name})", run_index(args.model, args.data, index_dir))
    port = free_port()
    server = start_server(index_dir, port, work / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        token = re.search(r'<meta name="m2d2-token" content="([^"]+)">', httpx.get(base + "/").text).group(1)
        hits = httpx.get(base + "/api/search", params={"q": "a sound", "k": 20}, timeout=60).json()["results"]
        audio_urls = [hit["audio_url"] for hit in hits if hit["audio_url"]]
        clip_path = Path(hits[0]["path"])
        clip = clip_path.read_bytes()
        print(
            f"  server pid {server.pid} on {base}; upload clip {clip_path.name} ({len(clip) / 1024:.0f} KiB, "
            f"{sf.info(str(clip_path)).duration:.1f} s); RSS {server_memory_mb(server.pid)[0]:.0f} MB after start"
        )
        began = time.perf_counter()
        latencies, statuses = run_load(base, token, clip, audio_urls, args.clients, args.requests_per_client)
        wall = time.perf_counter() - began
        total = sum(len(values) for values in latencies.values())
        rss, peak = server_memory_mb(server.pid)
        print(
            f"  {args.clients} concurrent clients x {args.requests_per_client} requests = {total} in {wall:.1f} s "
            f"({total / wall:.1f} requests/s); server RSS {rss:.0f} MB, peak {peak:.0f} MB"
        )
        for kind in LOAD_KINDS:
            values = np.asarray(latencies[kind]) * 1e3
            answered = ", ".join(f"{status}: {count}" for (k, status), count in sorted(statuses.items()) if k == kind)
            print(
                f"    {kind:<12} {len(values):>4} requests: p50 {np.percentile(values, 50):8.1f} ms, p99 "
                f"{np.percentile(values, 99):8.1f} ms, max {values.max():8.1f} ms; answers {answered}"
            )
        print("  uploads small as files, large as audio (one at a time, the server otherwise idle):")
        wav = io.BytesIO()
        sf.write(wav, np.zeros(2 * 16001, np.int16), 16001, format="WAV")
        for name, data in (
            ("5 min of 8-channel 96 kHz silence, FLAC", flac_of_silence(300, 8, 96_000)),
            ("1 h of 16 kHz silence, FLAC", flac_of_silence(3600, 1, 16_000)),
            ("2 s at 16001 Hz, WAV", wav.getvalue()),
        ):
            began = time.perf_counter()
            response = httpx.post(
                base + "/api/search-audio",
                files={"file": ("clip", data)},
                headers={"X-M2D2-Token": token},
                timeout=600,
            )
            seconds = time.perf_counter() - began
            rss, peak = server_memory_mb(server.pid)
            print(
                f"    {name} ({len(data) / 1024:.0f} KiB): {response.status_code} in {seconds * 1e3:.0f} ms, "
                f"server peak RSS {peak:.0f} MB; {response.json().get('detail', 'searched')}"
            )
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "real_sounds")
    parser.add_argument("--model", default=str(ROOT / "examples" / "demo_model"))
    parser.add_argument("--minutes", type=float, default=60.0, help="length of the long recording")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--skip-hour", action="store_true")
    parser.add_argument("--serve-load", action="store_true", help="concurrent clients of `m2d2-hf serve` instead")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients of --serve-load")
    parser.add_argument("--requests-per-client", type=int, default=12, help="requests of each --serve-load client")
    parser.add_argument(
        "--hybrid-retrieval", action="store_true", help="held-out caption retrieval, dense against hybrid, instead"
    )
    parser.add_argument(
        "--index", type=Path, help="--serve-load / --hybrid-retrieval this index (default: index --data first)"
    )
    parser.add_argument("--index-worker", nargs=3, help=argparse.SUPPRESS)
    bench_search_lifecycle.add_arguments(parser)
    args = parser.parse_args()
    if args.index_worker:
        index_worker(*args.index_worker)
        return

    print(f"machine: {describe_machine()}")
    print("note: a shared machine (other jobs may run on the same cores); figures are from this one run")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for mode, run, title in (
            (args.lifecycle, bench_search_lifecycle.lifecycle, "the index lifecycle (one process, in place)"),
            (args.swap, bench_search_lifecycle.swap, "switching the embedding space of `m2d2-hf serve` under load"),
        ):
            if mode:
                print(f"{title} ({Path(args.model).name}, {args.data.name}):")
                run(args, work)
                print(f"total {time.perf_counter() - started:.0f} s; at the end: {load_average()}")
                return
        if args.serve_load:
            print(f"concurrent load on `m2d2-hf serve` ({Path(args.model).name}):")
            serve_load(args, work)
            print(f"total {time.perf_counter() - started:.0f} s; at the end: {load_average()}")
            return
        if args.hybrid_retrieval:
            index_dir = args.index
            if index_dir is None:
                index_dir = work / "real_index"
                print_index(f"real clips ({args.data.name})", run_index(args.model, args.data, index_dir))
            print(f"captions → held-out clips ({Path(args.model).name}), dense against hybrid:")
            hybrid_retrieval(index_dir, args.data)
            print(f"total {time.perf_counter() - started:.0f} s; at the end: {load_average()}")
            return
        print(f"1. indexing with {Path(args.model).name} (window 2 s, hop 1 s, flat index), each in a fresh process:")
        real = run_index(args.model, args.data, work / "real_index")
        print_index(f"real clips ({args.data.name})", real)
        if not args.skip_hour:
            long_dir = work / "long"
            long_dir.mkdir()
            seconds = one_hour_recording(args.data, args.minutes, long_dir / "recording.flac")
            hour = run_index(args.model, long_dir, work / "hour_index")
            print_index(f"one {seconds / 60:.0f}-minute recording (real clips concatenated)", hour)
            print(f"    (its float32 waveform alone is {seconds * 16000 * 4 / MB:.0f} MB)")
        print("2. search latency (synthetic vectors):")
        from m2d2_hf.search.embedding import load_clap_model

        dim = load_clap_model(args.model)[0].config.projection_dim
        for size in args.sizes:
            bench_latency(size, dim, args.queries)
        print("3. text→audio retrieval with the real clips' captions:")
        retrieval(work / "real_index", args.data)
    print(f"total {time.perf_counter() - started:.0f} s; at the end: {load_average()}")


if __name__ == "__main__":
    main()
