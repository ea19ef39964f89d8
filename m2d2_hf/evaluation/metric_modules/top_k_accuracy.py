"""`evaluate` module: top-k accuracy of class scores, as `m2d2_hf.evaluation.metrics.top_k_accuracy`."""

import datasets
import evaluate

from m2d2_hf.evaluation.metrics import top_k_accuracy


class TopKAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of examples whose target class ranks within the k highest scores (ties: the "
            "lower class index ranks first, so top-1 is the accuracy of argmax).",
            citation="",
            inputs_description="predictions: per example, its score of every class; references: the target class "
            "index; k (compute keyword, default 1): the cut-off.",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k: int = 1) -> dict:
        return {"top_k_accuracy": top_k_accuracy(predictions, references, k)}
