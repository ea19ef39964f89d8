#!/usr/bin/env python
"""Cache caption embeddings for stage-1 pre-training (the CLAP targets), keyed by clip id.

The paper's setting (M2D-CLAP 2025 stage 1) is the default: nvidia/NV-Embed-v2 (4096-d) through its own `encode`,
with an empty instruction. NV-Embed-v2 runs its own code, so it needs --trust-remote-code (and a GPU, in bfloat16):

    python examples/cache_caption_embeddings.py --captions captions.csv --output caption_embeddings \\
        --trust-remote-code --device cuda --dtype bfloat16

A small local model for tests and demos (all-MiniLM-L6-v2, 384-d, masked mean pooling):

    python examples/cache_caption_embeddings.py --captions ../shared/data/real_sounds \\
        --model path/to/all-MiniLM-L6-v2 --pooling mean --output out/caption_embeddings

The output folder (Parquet shards `shard-NNNNN.parquet` with `id` and float16 `embeddings`, plus `info.json`) is
what `m2d2_hf.training.CaptionEmbeddingTable` and the pre-training script read. Re-running skips ids that are
already cached, so an interrupted run resumes and a repeated run does nothing.
"""

import argparse
import json
import logging
import sys

from m2d2_hf.training.captions import POOLING_MODES, cache_caption_embeddings


PAPER_MODEL = "nvidia/NV-Embed-v2"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--captions",
        required=True,
        help="captions: a CSV/TSV/JSONL/Parquet file, a local datasets folder or audiofolder (metadata.csv; ids are "
        "the file stems of file_name), or a hub dataset id",
    )
    parser.add_argument(
        "--model",
        default=PAPER_MODEL,
        help="text-embedding model (folder or hub id); the paper used nvidia/NV-Embed-v2 (4096-d)",
    )
    parser.add_argument("--output", required=True, help="output folder (created; resumed when it exists)")
    parser.add_argument(
        "--pooling",
        choices=POOLING_MODES,
        default="encode",
        help="mean: attention-masked mean of the last hidden state; cls: first token; last: last non-pad token; "
        "encode: the model's own encode() (NV-Embed-v2, the paper's setting) or sentence-transformers",
    )
    parser.add_argument("--instruction", default="", help="prefix prepended to every caption (paper: empty)")
    parser.add_argument("--batch-size", type=int, default=64, help="captions per forward pass")
    parser.add_argument("--max-length", type=int, default=512, help="token limit per caption")
    parser.add_argument("--id-column", default="id", help="clip-id column (else the file stem of file_name/audio)")
    parser.add_argument("--caption-column", default="caption", help="caption column (a string or a list of strings)")
    parser.add_argument("--split", default="train", help="split of a hub dataset / DatasetDict folder")
    parser.add_argument("--separator", default=None, help="also split caption strings at this separator")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: float32)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings before storing")
    parser.add_argument(
        "--append-eos",
        action="store_true",
        help="append the tokenizer's EOS token (NV-Embed-v2's sentence-transformers usage)",
    )
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the model's own code (required for NV-Embed-v2)"
    )
    parser.add_argument("--shard-size", type=int, default=10000, help="clips per output shard")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    summary = cache_caption_embeddings(
        args.captions,
        args.model,
        args.output,
        pooling=args.pooling,
        instruction=args.instruction,
        batch_size=args.batch_size,
        max_length=args.max_length,
        normalize=args.normalize,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        append_eos=args.append_eos,
        id_column=args.id_column,
        caption_column=args.caption_column,
        split=args.split,
        separator=args.separator,
        shard_size=args.shard_size,
        progress=not args.no_progress,
    )
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
