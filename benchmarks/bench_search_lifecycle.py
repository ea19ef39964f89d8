"""The live index lifecycle, the `--lifecycle` and `--swap` modes of bench_search.py.

--lifecycle: `build_index` of --initial (200) real clips of --data into a fresh index, then updates of the same index
in the same process: the other clips added, --renamed (20) renamed, --deleted (10) deleted; per step the sounds
embedded / reused / reused by content hash (with an independent count of the decodes for embedding), its time and its
ratio to the first build's; then --queries (100) caption queries ranking every sound, counting hits of deleted sounds.

--swap: an index of the real clips with two spaces (the demo model's, active, and the demo model with its audio
projection nudged: another weights hash, other embeddings, built with add_space), `m2d2-hf serve` of it in a
subprocess, --swap-clients (8) concurrent clients sending text queries until --swap-queries (≥ 500) answers while the
spaces are switched --swaps (6) times through `POST /api/space`; failures (no answer or not 200), and answers mixing
spaces: an answer whose hits are not those its named space gives for that query (computed beforehand in-process).
"""

import argparse
import csv
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np


def _rows(data: Path) -> list[dict]:
    with open(data / "metadata.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _copy(data: Path, rows: list[dict], folder: Path) -> None:
    for row in rows:
        target = folder / row["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(data / row["file_name"], target)


def lifecycle(args: argparse.Namespace, work: Path) -> None:
    from m2d2_hf.search import SoundIndex, build_index, building

    rows = _rows(args.data)
    first, rest = rows[: args.initial], rows[args.initial :]
    sounds, output = work / "sounds", work / "index"
    decodes = []
    decode = building.decode_audio
    building.decode_audio = lambda value, **kwargs: (decodes.append(value), decode(value, **kwargs))[1]

    def audio(rows: list[dict]) -> float:
        return sum(float(row["duration_s"]) for row in rows)

    def step(name: str, embedded: list[dict]) -> None:
        decodes.clear()
        update = output.exists()
        summary = build_index(args.model, sounds, output, progress=False, log=lambda line: None, update=update)
        base = times[0] if times else summary.seconds
        times.append(summary.seconds)
        print(
            f"  {name}: {summary.num_files} sounds; {summary.embedded_files} embedded ({len(decodes)} decoded for "
            f"embedding), {summary.reused_files} reused, {summary.moved_files} reused by content hash; "
            f"{summary.seconds:.2f} s = {summary.seconds / base:.3f} of the first build's (what it embedded is "
            f"{len(embedded) / len(first):.3f} of the first build's clips, {audio(embedded) / audio(first):.3f} of "
            "its audio)"
        )

    times: list[float] = []
    _copy(args.data, first, sounds)
    step(f"build of {len(first)} clips", first)
    _copy(args.data, rest, sounds)
    step(f"add {len(rest)}", rest)
    renamed = first[: args.renamed]
    for row in renamed:
        path = sounds / row["file_name"]
        path.rename(path.with_name("renamed_" + path.name))
    step(f"rename {len(renamed)}", [])
    deleted = rest[: args.deleted]
    for row in deleted:
        (sounds / row["file_name"]).unlink()
    step(f"delete {len(deleted)}", [])

    index = SoundIndex(output)
    gone = {str((sounds / row["file_name"]).resolve()) for row in deleted + renamed}
    captions = [row["caption"] for row in rows][: args.queries]
    results = index.search(text=captions, top_k=len(index))
    hits = sum(hit["key"] in gone for result in results for hit in result["results"])
    print(
        f"  {len(captions)} caption queries ranking all {len(index)} sounds: {hits} hits for the {len(deleted)} "
        f"deleted and {len(renamed)} renamed-away files (their old names)"
    )
    building.decode_audio = decode


def _other_model(model: str, folder: Path) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, folder)
    weights = load_file(folder / "model.safetensors")
    weights["audio_projection.fc2.weight"] = weights["audio_projection.fc2.weight"] * 1.01 + 0.01
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return str(folder)


def swap(args: argparse.Namespace, work: Path) -> None:
    import httpx
    from bench_search import free_port, start_server

    from m2d2_hf.search import SoundIndex, build_index

    index_dir = work / "index"
    first = build_index(args.model, args.data, index_dir, progress=False, log=lambda line: None)
    other = _other_model(args.model, work / "other_model")
    second = build_index(other, args.data, index_dir, progress=False, log=lambda line: None, add_space=True)
    print(
        f"  index of {first.num_files} clips: space {first.space} (active, built in {first.seconds:.1f} s) and "
        f"{second.space} (added beside it in {second.seconds:.1f} s)"
    )
    queries = sorted({row["caption"] for row in _rows(args.data)})[:20]
    expected = {}
    for space in (first.space, second.space):
        index = SoundIndex(index_dir, space=space)
        for query in queries:
            (result,) = index.search(text=[query], top_k=5)
            expected[space, query] = result["results"]
        del index

    def same(hits: list, wanted: list) -> bool:
        return [hit["key"] for hit in hits] == [hit["key"] for hit in wanted] and all(
            abs(hit["score"] - other["score"]) < 1e-4 for hit, other in zip(hits, wanted)
        )

    port = free_port()
    server = start_server(index_dir, port, work / "server.log")
    base = f"http://127.0.0.1:{port}"
    try:
        import re

        token = re.search(r'<meta name="m2d2-token" content="([^"]+)">', httpx.get(base + "/").text).group(1)
        answers, lock, done = [], threading.Lock(), threading.Event()

        def client(number: int) -> None:
            with httpx.Client(base_url=base, timeout=120) as session:
                for step in range(10**6):
                    if done.is_set():
                        return
                    query = queries[(number * 7 + step) % len(queries)]
                    began = time.perf_counter()
                    try:
                        response = session.get("/api/search", params={"q": query, "k": 5})
                        answer = (query, response.status_code, response.json(), time.perf_counter() - began)
                    except (httpx.HTTPError, ValueError):
                        answer = (query, 0, None, time.perf_counter() - began)
                    with lock:
                        answers.append(answer)
                        if len(answers) >= args.swap_queries and swaps_done[0] >= args.swaps:
                            done.set()

        swaps_done, switches = [0], []
        began = time.perf_counter()
        with ThreadPoolExecutor(args.swap_clients) as pool:
            running = [pool.submit(client, number) for number in range(args.swap_clients)]
            for number in range(args.swaps):
                while len(answers) < (number + 1) * args.swap_queries / (args.swaps + 1):
                    time.sleep(0.01)
                target = second.space if number % 2 == 0 else first.space
                started = time.perf_counter()
                response = httpx.post(
                    base + "/api/space", json={"space": target}, headers={"X-M2D2-Token": token}, timeout=120
                )
                switches.append((response.status_code, response.json().get("space") == target))
                switches[-1] += (time.perf_counter() - started,)
                swaps_done[0] += 1
            for future in running:
                future.result()
        wall = time.perf_counter() - began
        failures = sum(status != 200 for _, status, _, _ in answers)
        mixed = sum(
            status == 200 and not same(answer["results"], expected[answer["space"], query])
            for query, status, answer, _ in answers
        )
        spaces = Counter(answer["space"] for _, status, answer, _ in answers if status == 200)
        latencies = np.asarray([seconds for *_, seconds in answers]) * 1e3
        print(
            f"  {len(answers)} queries from {args.swap_clients} concurrent clients in {wall:.1f} s during "
            f"{len(switches)} switches ({', '.join(f'{code} in {seconds:.2f} s' for code, _, seconds in switches)}; "
            f"{sum(ok for _, ok, _ in switches)} named the space asked for)"
        )
        print(
            f"  failures {failures}, answers mixing spaces {mixed}; answers per space "
            f"{', '.join(f'{space[:24]}…: {count}' for space, count in spaces.items())}; latency p50 "
            f"{np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms, max "
            f"{latencies.max():.1f} ms"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lifecycle", action="store_true", help="index, add, rename, delete: counts and times")
    parser.add_argument("--initial", type=int, default=200, help="clips of the first --lifecycle build")
    parser.add_argument("--renamed", type=int, default=20, help="clips --lifecycle renames")
    parser.add_argument("--deleted", type=int, default=10, help="clips --lifecycle deletes")
    parser.add_argument("--swap", action="store_true", help="switch spaces of a served index under load")
    parser.add_argument("--swap-queries", type=int, default=500, help="queries during --swap (at least)")
    parser.add_argument("--swaps", type=int, default=6, help="space switches during --swap")
    parser.add_argument("--swap-clients", type=int, default=8, help="concurrent clients of --swap")
