"""The package's metrics as `evaluate` modules: each loads offline from the installed package and computes what the
package function computes."""

import evaluate
import numpy as np
import pytest

from m2d2_hf.evaluation import METRIC_MODULES, metric_module_path
from m2d2_hf.evaluation.metrics import mean_average_precision, text_to_audio_metrics, top_k_accuracy


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(evaluate.config, "HF_EVALUATE_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_modules_load_offline_and_equal_the_package_functions():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((40, 6))
    targets = rng.integers(0, 6, 40)
    multi_hot = (rng.random((40, 6)) < 0.3).astype(np.int64)
    multi_hot[0] = 1  # every class has a positive
    similarity = rng.standard_normal((8, 20))  # 8 clips, 20 captions
    caption_audio = np.arange(20) % 8

    top_k = evaluate.load(metric_module_path("top_k_accuracy"))
    for k in (1, 3):
        result = top_k.compute(predictions=scores, references=targets, k=k)
        assert result == {"top_k_accuracy": pytest.approx(top_k_accuracy(scores, targets, k), abs=1e-12)}
    mean_ap = evaluate.load(metric_module_path("mean_average_precision"))
    result = mean_ap.compute(predictions=scores, references=multi_hot)
    assert result == {"mAP": pytest.approx(mean_average_precision(scores, multi_hot), abs=1e-12)}
    retrieval = evaluate.load(metric_module_path("text_to_audio_retrieval"))
    result = retrieval.compute(predictions=similarity.T, references=caption_audio)
    assert result == pytest.approx(text_to_audio_metrics(similarity, caption_audio), abs=1e-12)
    assert result["R@1"] < result["R@10"] == 1.0  # 8 clips: the relevant one is always within the top 10

    batched = evaluate.load(metric_module_path("top_k_accuracy"))  # added batch by batch, as in an eval loop
    for start in range(0, 40, 16):
        batched.add_batch(predictions=scores[start : start + 16], references=targets[start : start + 16])
    assert batched.compute(k=3)["top_k_accuracy"] == pytest.approx(top_k_accuracy(scores, targets, 3), abs=1e-12)


def test_an_unknown_module_name_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown metric module 'recall'; the package ships top_k_accuracy"):
        metric_module_path("recall")
    assert len(METRIC_MODULES) == 3
