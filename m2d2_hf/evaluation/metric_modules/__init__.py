"""The package's metrics as `evaluate` modules, loaded offline from the installed package:

    import evaluate
    from m2d2_hf.evaluation import metric_module_path

    top_k = evaluate.load(metric_module_path("top_k_accuracy"))
    top_k.compute(predictions=scores, references=targets, k=5)

`evaluate.load("accuracy")` and the other Hub metrics fetch their scripts from the Hugging Face Hub, which fails
offline; a path to one of these files loads without the network. Each module computes its number with the function
of `m2d2_hf.evaluation.metrics` it names, so both give the same values (tests/test_evaluate_modules.py).
"""

from pathlib import Path


METRIC_MODULES = ("top_k_accuracy", "mean_average_precision", "text_to_audio_retrieval")


def metric_module_path(name: str) -> str:
    """The file of the package's `evaluate` module `name` (one of `METRIC_MODULES`), for `evaluate.load`."""
    if name not in METRIC_MODULES:
        raise ValueError(f"unknown metric module {name!r}; the package ships {', '.join(METRIC_MODULES)}")
    return str(Path(__file__).with_name(f"{name}.py"))


__all__ = ["METRIC_MODULES", "metric_module_path"]
