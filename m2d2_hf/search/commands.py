"""Arguments and actions of `m2d2-hf index`, `m2d2-hf search` and `m2d2-hf serve` (the CLI adds them as
sub-commands and turns the `ValueError` / `OSError` / `ImportError` they raise into one-line messages).

    m2d2-hf index MODEL_DIR SOURCE --output INDEX_DIR [--window 2 --hop 1] [--index-type flat|ivf|hnsw]
        [--index-param nlist=1000 ...]
    accelerate launch [...] $(which m2d2-hf) index ...          (each process embeds its share)
    m2d2-hf search INDEX_DIR "a dog barks" ["glass breaking" ...] [--audio example.wav ...] [--top-k 10] [--json]
        [--where "label = 'dog' and duration < 5"] [--hybrid] [--dedup 0.95] [--offset 10]
    m2d2-hf serve INDEX_DIR [--port 7860] [--max-upload-seconds 60 --max-upload-channels 2 --max-upload-rate 96000
        --max-upload-mb 20]
    m2d2-hf index NEW_MODEL_DIR SOURCE --output INDEX_DIR --add-space     (a space for another model, beside)
    m2d2-hf index-space INDEX_DIR [--activate KEY | --remove KEY] [--json]
"""

import argparse
import json
import sys
from pathlib import Path

from ..argument_types import cosine_threshold, non_negative_int, positive_int, positive_seconds


def _index_param(text: str) -> tuple[str, int]:
    name, equals, value = text.partition("=")
    if not equals or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. nlist=4000), got {text!r}")
    return name, positive_int(value)


def _port(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is at most 65535, got {value}")
    return value


def add_index_arguments(parser: argparse.ArgumentParser) -> None:
    from .vector_index import INDEX_TYPES

    parser.add_argument("model", metavar="MODEL_DIR", help="M2D2 CLAP model folder or hub id")
    parser.add_argument(
        "source",
        metavar="SOURCE",
        help="a folder of audio files, an audiofolder with metadata.csv/jsonl, a metadata CSV/JSONL/Parquet file "
        "(file_name column), a datasets save_to_disk folder, or a dataset id for datasets.load_dataset",
    )
    parser.add_argument("--output", "-o", required=True, type=Path, help="the index folder to write")
    parser.add_argument("--window", type=positive_seconds, default=2.0, help="window length in seconds (default 2)")
    parser.add_argument("--hop", type=positive_seconds, default=1.0, help="hop between windows in seconds (default 1)")
    parser.add_argument(
        "--index-type",
        choices=INDEX_TYPES,
        default="flat",
        help="flat: exact inner product (default); ivf / hnsw: approximate, for 10^6 vectors and more (their "
        "recall@10 against exact is printed)",
    )
    parser.add_argument(
        "--index-param",
        action="append",
        type=_index_param,
        default=[],
        metavar="NAME=VALUE",
        help="override a FAISS parameter (repeatable): ivf nlist / nprobe, hnsw M / ef_construction / ef_search",
    )
    parser.add_argument("--split", help="keep the rows of this split (a metadata split column or a dataset split)")
    parser.add_argument(
        "--audio_column", "--audio-column", default="audio", help="audio column of a dataset source (default audio)"
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sounds / windows per forward (default 8)")
    parser.add_argument(
        "--files-per-shard", type=positive_int, default=64, help="sounds per resumable shard (default 64)"
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="update the index's space of this model and settings (embed only added and changed files; renamed or "
        "moved ones are reused by content hash); refused when there is none, instead of embedding everything",
    )
    parser.add_argument(
        "--add-space",
        action="store_true",
        help="an index of other models: add this model's embedding space beside theirs, leaving the active space "
        "active (switch with `m2d2-hf index-space INDEX_DIR --activate KEY`), instead of replacing them",
    )


def run_index(args: argparse.Namespace) -> None:
    from .building import build_index

    summary = build_index(
        args.model,
        args.source,
        args.output,
        window_seconds=args.window,
        hop_seconds=args.hop,
        index_type=args.index_type,
        index_params=dict(args.index_param),
        batch_size=args.batch_size,
        files_per_shard=args.files_per_shard,
        split=args.split,
        audio_column=args.audio_column,
        add_space=args.add_space,
        update=args.update,
    )
    if summary is None:  # a non-main process of `accelerate launch`
        return
    rate = summary.audio_seconds / max(summary.seconds, 1e-9)
    print(
        f"indexed {summary.num_files} sounds ({summary.audio_seconds / 3600:.3f} h, {summary.num_vectors} vectors) "
        f"into {summary.output} (space {summary.space}): {summary.embedded_files} embedded, {summary.reused_files} "
        f"reused, {summary.moved_files} renamed or moved (reused by content), {len(summary.failed)} failed; "
        f"{summary.seconds:.1f} s ({rate:.1f} audio hours per hour, "
        f"{summary.num_files / max(summary.seconds, 1e-9):.1f} sounds/s)"
    )
    if summary.recall_at_10 is not None:
        print(f"recall@10 against exact search: {summary.recall_at_10:.4f}")


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX_DIR", type=Path, help="an index folder made by `m2d2-hf index`")
    parser.add_argument("queries", metavar="QUERY", nargs="*", help="text queries")
    parser.add_argument("--audio", action="append", type=Path, default=[], help="search by this example (repeatable)")
    parser.add_argument("--top-k", type=positive_int, default=10, help="sounds per query (default 10)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--model", help="embed queries with this model folder (default: the index's own)")
    parser.add_argument(
        "--where",
        metavar="FILTER",
        help="keep the sounds whose metadata matches, e.g. \"label = 'dog' and duration < 5\", "
        "\"split in ('test', 'train')\", \"path like '%%/dogs/%%'\" (columns: key, path, name, duration and the "
        "source's metadata columns)",
    )
    parser.add_argument(
        "--hybrid",
        action="store_true",
        help="fuse the text queries' ranking with BM25 over file names and text metadata (reciprocal rank)",
    )
    parser.add_argument(
        "--dedup",
        type=cosine_threshold,
        metavar="COSINE",
        help="drop hits this similar (cosine, e.g. 0.95) to a higher-ranked one, refilling to --top-k",
    )
    parser.add_argument("--offset", type=non_negative_int, default=0, help="skip this many hits (paging; default 0)")


def run_search(args: argparse.Namespace) -> None:
    from .api import SoundIndex

    if not args.queries and not args.audio:
        raise ValueError('no query: pass text queries ("a dog barks") and/or --audio example.wav')
    for path in args.audio:
        if not path.is_file():
            raise ValueError(f"no such --audio file: {path}")
    index = SoundIndex(args.index, model=args.model)
    results = index.search(
        text=args.queries,
        audio=[str(path) for path in args.audio],
        top_k=args.top_k,
        offset=args.offset,
        where=args.where,
        hybrid=args.hybrid,
        dedup=args.dedup,
    )
    if args.json:
        print(json.dumps([{**result, "space": index.space} for result in results], indent=2))
        return
    for result in results:
        print(f"query: {result['query']}")
        for hit in result["results"]:
            print(
                f"  {hit['rank']:>3}  {hit['score']:.4f}  {hit['key']}  "
                f"[{hit['start']:.2f}-{hit['end']:.2f} s of {hit['duration']:.2f} s]"
            )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX_DIR", type=Path, help="an index folder made by `m2d2-hf index`")
    from ..data.audio import AudioLimits
    from .app import MAX_UPLOAD_BYTES

    default = AudioLimits()
    parser.add_argument("--port", type=_port, default=7860, help="port on 127.0.0.1 (default 7860)")
    parser.add_argument("--model", help="embed queries with this model folder (default: the index's own)")
    parser.add_argument(
        "--max-upload-seconds",
        type=positive_seconds,
        default=default.max_seconds,
        help=f"longest uploaded clip, from its header (default {default.max_seconds:g}; longer ones get 413)",
    )
    parser.add_argument(
        "--max-upload-channels",
        type=positive_int,
        default=default.max_channels,
        help=f"most channels of an uploaded clip (default {default.max_channels})",
    )
    parser.add_argument(
        "--max-upload-rate",
        type=positive_int,
        default=default.max_sampling_rate,
        help=f"highest sampling rate of an uploaded clip in Hz (default {default.max_sampling_rate})",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=positive_int,
        default=MAX_UPLOAD_BYTES // 2**20,
        help=f"largest uploaded file in MB (default {MAX_UPLOAD_BYTES // 2**20})",
    )


def run_serve(args: argparse.Namespace) -> None:
    from ..data.audio import AudioLimits
    from .app import require_app_extra, serve

    require_app_extra()
    limits = AudioLimits(args.max_upload_seconds, args.max_upload_channels, args.max_upload_rate)
    print(
        f"serving {args.index} on http://127.0.0.1:{args.port}/ (Ctrl-C stops); uploads up to "
        f"{limits.max_seconds:g} s, {limits.max_channels} channels, {limits.max_sampling_rate} Hz, "
        f"{args.max_upload_mb} MB",
        file=sys.stderr,
    )
    serve(args.index, port=args.port, model=args.model, limits=limits, max_upload_bytes=args.max_upload_mb * 2**20)


def add_space_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("index", metavar="INDEX_DIR", type=Path, help="an index folder made by `m2d2-hf index`")
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--activate",
        metavar="KEY",
        help="make this space (its key, or the start of it) the active one: what `search` and a new `serve` use; a "
        "running `serve` switches on POST /api/space",
    )
    action.add_argument("--remove", metavar="KEY", help="drop this space (not the active one) from the index")
    parser.add_argument("--json", action="store_true", help="print the spaces as JSON")


def run_space(args: argparse.Namespace) -> None:
    from .building import activate_space, list_spaces, remove_space

    if args.activate:
        print(f"active space of {args.index}: {activate_space(args.index, args.activate)}")
    elif args.remove:
        print(f"removed space {remove_space(args.index, args.remove)} from {args.index}")
    spaces = list_spaces(args.index)
    if args.json:
        print(json.dumps(spaces, indent=2))
        return
    for space in spaces:
        print(
            f"{'*' if space['active'] else ' '} {space['space']}  model {space['model']['name']}  "
            f"{space['num_files']} sounds, {space['num_vectors']} vectors ({space['faiss']['type']}), window "
            f"{space['window_seconds']:g} s, created {space.get('created', '?')}"
        )


__all__ = [
    "add_index_arguments",
    "add_space_arguments",
    "add_search_arguments",
    "add_serve_arguments",
    "run_index",
    "run_search",
    "run_serve",
    "run_space",
]
