"""Linear evaluation of an M2D2 model's frozen clip embeddings (as EVAR): prints a table, writes a JSON report.

    python examples/evaluate_linear_probe.py MODEL_DIR DATA [--embedding frame_mean|clap]
        [--split-column split | --fold-column fold] [--seeds 42,43,44] [--output report.json]

DATA is a folder with metadata.csv (file_name, label, split, ...), a `datasets` folder or a hub dataset id. The split
column says train / valid / test per clip (without valid clips, a stratified fraction of train validates); with
--fold-column, each fold is the test set once and the score is the mean over folds. See
`m2d2_hf.evaluation.evaluate_linear_probe`.
"""

from m2d2_hf.evaluation import evaluate_linear_probe
from m2d2_hf.evaluation.cli import add_label_arguments, evaluation_parser, format_table, run_evaluation
from m2d2_hf.evaluation.data import EMBEDDING_LEVELS


def main(argv: list[str] | None = None) -> None:
    parser = evaluation_parser(__doc__, split_filter=False)
    add_label_arguments(parser)
    parser.add_argument("--fold-column", help="cross-validate over the folds of this column instead of the split")
    parser.add_argument("--embedding", choices=EMBEDDING_LEVELS, default="frame_mean", help="default: frame_mean")
    parser.add_argument("--seeds", default="42,43,44", help="comma-separated seeds (default: 42,43,44)")
    parser.add_argument("--valid-fraction", type=float, default=0.1, help="default: 0.1")
    parser.add_argument("--lr", type=float, default=3e-5, help="default: 3e-5")
    parser.add_argument("--max-epochs", type=int, default=200, help="default: 200")
    parser.add_argument("--patience", type=int, default=20, help="default: 20")
    args = parser.parse_args(argv)

    report = run_evaluation(
        args,
        evaluate_linear_probe,
        label_column=args.label_column,
        split_column=args.split_column,
        fold_column=args.fold_column,
        embedding=args.embedding,
        multi_label=args.multi_label,
        label_separator=args.label_separator,
        seeds=[int(seed) for seed in args.seeds.split(",")],
        valid_fraction=args.valid_fraction,
        lr=args.lr,
        max_epochs=args.max_epochs,
        patience=args.patience,
    )

    columns = ["seed", "fold", "train", "valid", "test", "best_epoch", "test_score"]
    rows = [[run[column] for column in columns] for run in report["runs"]]
    print(format_table(columns[:-1] + [report["metric"]], rows))
    print(f"\n{report['metric']}: {report['score']:.4f} ± {report['std']:.4f} over {len(report['per_seed'])} seeds")


if __name__ == "__main__":
    main()
