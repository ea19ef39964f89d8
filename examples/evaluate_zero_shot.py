"""Zero-shot classification of an evaluation set with an M2D2 CLAP model: prints a table, writes a JSON report.

    python examples/evaluate_zero_shot.py MODEL_DIR DATA --split test [--labels-file classes.txt]
        [--template "{} can be heard"] [--multi-label] [--output report.json]

DATA is a folder with metadata.csv (file_name, label, ...), a `datasets` folder or a hub dataset id. The class names
default to the distinct labels of the evaluated clips. See `m2d2_hf.evaluation.zero_shot_classify`.
"""

import argparse
from pathlib import Path

from m2d2_hf.cli import DEFAULT_TEMPLATE, parse_labels
from m2d2_hf.evaluation import zero_shot_classify
from m2d2_hf.evaluation.data import (
    add_common_arguments,
    evaluation_set_from_args,
    format_table,
    load_model_and_processor,
    save_report,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--label-column", default="label", help="column holding the labels (default: label)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class names (default: the labels found in the data)")
    labels.add_argument("--labels-file", type=Path, help="class names, one per line")
    parser.add_argument("--template", default=DEFAULT_TEMPLATE, help=f"prompt (default: {DEFAULT_TEMPLATE!r})")
    parser.add_argument("--multi-label", action="store_true", help="label lists per clip; report mAP")
    parser.add_argument("--label-separator", default=",", help="separator of multi-label names in a text column")
    args = parser.parse_args(argv)

    evaluation_set = evaluation_set_from_args(args)
    model, processor, device = load_model_and_processor(args.model, args.device)
    report = zero_shot_classify(
        model,
        processor,
        evaluation_set,
        labels=parse_labels(args) if args.labels or args.labels_file else None,
        template=args.template,
        batch_size=args.batch_size,
        multi_label=args.multi_label,
        device=device,
        label_column=args.label_column,
        label_separator=args.label_separator,
    )
    report = {"model": args.model, "data": args.data, "split": args.split, **report}
    if args.output:
        save_report(report, args.output)

    key = "average_precision" if args.multi_label else "top1_accuracy"
    count = "positives" if args.multi_label else "clips"
    overall = ["mAP"] if args.multi_label else ["top1_accuracy", "top5_accuracy"]
    print(format_table(["metric", "value"], [[name, report[name]] for name in overall]))
    print()
    rows = [[label, entry[count], entry[key]] for label, entry in report["per_class"].items()]
    print(format_table(["label", count, key], rows))


if __name__ == "__main__":
    main()
