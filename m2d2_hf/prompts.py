"""Zero-shot prompts from class names, as the original evaluation makes them: underscores read as spaces, each name
put into a template ("{} can be heard" by default)."""

from collections.abc import Sequence

from .configuration_m2d2 import M2D2Config
from .data.labels import check_unique_labels
from .pipelines import check_hypothesis_template


# The prompt of the original zero-shot evaluation (docs/method.md §7, the ESC-50 notebook): M2D2Config's default
# `zero_shot_template`, for folders whose config predates the field and for callers without a model.
DEFAULT_TEMPLATE = M2D2Config.zero_shot_template


class PromptError(ValueError):
    """A template without one `{}` for the class name, a repeated class name, or two that give the same prompt."""


def label_prompts(labels: Sequence[str], template: str) -> dict[str, str]:
    """Maps each prompt label (underscores read as spaces, as the original evaluation) back to its given name.

    Raises:
        PromptError: when `template` has no `{}` for the name, a label is repeated or two labels give the same
            prompt.
    """
    try:
        check_hypothesis_template(template)
        check_unique_labels(labels)
    except ValueError as error:
        raise PromptError(str(error)) from error
    names: dict[str, str] = {}
    for label in labels:
        spoken = label.replace("_", " ")
        if spoken in names:
            raise PromptError(f"labels {names[spoken]!r} and {label!r} give the same prompt")
        names[spoken] = label
    return names


__all__ = ["DEFAULT_TEMPLATE", "PromptError", "label_prompts"]
