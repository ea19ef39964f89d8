"""Zero-shot classification of an evaluation set with an M2D2 CLAP model: prints a table, writes a JSON report.

    python examples/evaluate_zero_shot.py MODEL_DIR DATA --split test [--labels-file classes.txt]
        [--template "{} can be heard"] [--multi-label] [--output report.json]

DATA is a folder with metadata.csv (file_name, label, ...), a `datasets` folder or a hub dataset id. The class names
default to the distinct labels of the evaluated clips. See `m2d2_hf.evaluation.zero_shot_classify`.
"""

from pathlib import Path

from m2d2_hf.cli import parse_labels
from m2d2_hf.evaluation import zero_shot_classify
from m2d2_hf.evaluation.cli import add_label_arguments, evaluation_parser, format_table, run_evaluation
from m2d2_hf.prompts import DEFAULT_TEMPLATE


def main(argv: list[str] | None = None) -> None:
    parser = evaluation_parser(__doc__)
    add_label_arguments(parser)
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class names (default: the labels found in the data)")
    labels.add_argument("--labels-file", type=Path, help="class names, one per line")
    parser.add_argument("--template", help=f"prompt (default: the model's zero_shot_template, {DEFAULT_TEMPLATE!r})")
    args = parser.parse_args(argv)

    report = run_evaluation(
        args,
        zero_shot_classify,
        labels=parse_labels(args) if args.labels or args.labels_file else None,
        template=args.template,
        multi_label=args.multi_label,
        label_column=args.label_column,
        label_separator=args.label_separator,
    )

    key = "average_precision" if args.multi_label else "top1_accuracy"
    count = "positives" if args.multi_label else "clips"
    overall = ["mAP"] if args.multi_label else ["top1_accuracy", "top5_accuracy"]
    print(format_table(["metric", "value"], [[name, report[name]] for name in overall]))
    print()
    rows = [[label, entry[count], entry[key]] for label, entry in report["per_class"].items()]
    print(format_table(["label", count, key], rows))


if __name__ == "__main__":
    main()
