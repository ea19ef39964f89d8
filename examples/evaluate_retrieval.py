"""Audio-text retrieval on an evaluation set with an M2D2 CLAP model: prints a table, writes a JSON report.

    python examples/evaluate_retrieval.py MODEL_DIR DATA --split test [--caption-column caption ...]
        [--output report.json]

DATA is a folder with metadata.csv (file_name, caption, ...), a `datasets` folder or a hub dataset id. Several
caption columns (e.g. Clotho's caption_1 .. caption_5), list-valued caption columns, and one row per caption are all
accepted. Reports R@1/5/10 and mAP@10 in both directions. See `m2d2_hf.evaluation.evaluate_retrieval`.
"""

import argparse

from m2d2_hf.evaluation import evaluate_retrieval
from m2d2_hf.evaluation.data import (
    add_common_arguments,
    evaluation_set_from_args,
    format_table,
    load_model_and_processor,
    save_report,
)
from m2d2_hf.evaluation.metrics import RETRIEVAL_KS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument(
        "--caption-column", nargs="+", default=["caption"], help="column(s) holding the captions (default: caption)"
    )
    parser.add_argument(
        "--text-batch-size", type=int, default=1, help="captions per forward pass (default: 1, as the original)"
    )
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries scored at once (default: 1024)")
    args = parser.parse_args(argv)

    evaluation_set = evaluation_set_from_args(args)
    model, processor, device = load_model_and_processor(args.model, args.device)
    report = evaluate_retrieval(
        model,
        processor,
        evaluation_set,
        batch_size=args.batch_size,
        text_batch_size=args.text_batch_size,
        caption_columns=args.caption_column,
        chunk_size=args.chunk_size,
        device=device,
    )
    report = {"model": args.model, "data": args.data, "split": args.split, **report}
    if args.output:
        save_report(report, args.output)

    names = [f"R@{k}" for k in RETRIEVAL_KS] + ["mAP@10"]
    directions = ("audio_to_text", "text_to_audio")
    rows = [[direction] + [report[direction][name] for name in names] for direction in directions]
    print(f"{report['num_clips']} clips, {report['num_captions']} captions")
    print(format_table(["direction"] + names, rows))


if __name__ == "__main__":
    main()
