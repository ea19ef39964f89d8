"""`evaluate` module: text→audio retrieval (R@1/5/10, mAP@10, ranks), as
`m2d2_hf.evaluation.metrics.text_to_audio_metrics`."""

import datasets
import evaluate
import numpy as np

from m2d2_hf.evaluation.metrics import text_to_audio_metrics


class TextToAudioRetrieval(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Text-to-audio retrieval: each caption query has one relevant clip; recall at 1, 5, 10, "
            "mAP@10 and the median and mean rank of the relevant clip.",
            citation="",
            inputs_description="predictions: per caption, its similarity to every clip; references: the index of "
            "the clip the caption describes (every clip needs at least one caption).",
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("float64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references) -> dict:
        # The package function takes the [num_audio, num_captions] similarity matrix; these rows are its columns.
        return text_to_audio_metrics(np.asarray(predictions).T, references)
