"""`evaluate` module: macro mAP of multi-label scores, as `m2d2_hf.evaluation.metrics.mean_average_precision`."""

import datasets
import evaluate

from m2d2_hf.evaluation.metrics import mean_average_precision


class MeanAveragePrecision(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Macro mean average precision over the classes that have a positive example "
            "(sklearn's average_precision_score per class).",
            citation="",
            inputs_description="predictions: per example, its score of every class; references: per example, its "
            "multi-hot targets (0/1 per class).",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Sequence(datasets.Value("int64")),
                }
            ),
        )

    def _compute(self, predictions, references) -> dict:
        return {"mAP": mean_average_precision(predictions, references)}
