"""Audio-text retrieval on an evaluation set with an M2D2 CLAP model: prints a table, writes a JSON report.

    python examples/evaluate_retrieval.py MODEL_DIR DATA --split test [--caption-column caption ...]
        [--output report.json]

DATA is a folder with metadata.csv (file_name, caption, ...), a `datasets` folder or a hub dataset id. Several
caption columns (e.g. Clotho's caption_1 .. caption_5), list-valued caption columns, and one row per caption are all
accepted. Reports R@1/5/10 and mAP@10 in both directions. See `m2d2_hf.evaluation.evaluate_retrieval`.
"""

from m2d2_hf.evaluation import evaluate_retrieval
from m2d2_hf.evaluation.cli import evaluation_parser, format_table, run_evaluation
from m2d2_hf.evaluation.metrics import RETRIEVAL_KS


def main(argv: list[str] | None = None) -> None:
    parser = evaluation_parser(__doc__)
    parser.add_argument(
        "--caption-column", nargs="+", default=["caption"], help="column(s) holding the captions (default: caption)"
    )
    parser.add_argument(
        "--text-batch-size", type=int, default=1, help="captions per forward pass (default: 1, as the original)"
    )
    parser.add_argument("--chunk-size", type=int, default=1024, help="queries scored at once (default: 1024)")
    args = parser.parse_args(argv)

    report = run_evaluation(
        args,
        evaluate_retrieval,
        text_batch_size=args.text_batch_size,
        caption_columns=args.caption_column,
        chunk_size=args.chunk_size,
    )

    names = [f"R@{k}" for k in RETRIEVAL_KS] + ["mAP@10"]
    directions = ("audio_to_text", "text_to_audio")
    rows = [[direction] + [report[direction][name] for name in names] for direction in directions]
    print(f"{report['num_clips']} clips, {report['num_captions']} captions")
    print(format_table(["direction"] + names, rows))


if __name__ == "__main__":
    main()
