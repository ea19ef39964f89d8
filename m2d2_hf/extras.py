"""The package's optional extras. The model alone (configs, feature extractor, models, processor, pipelines) needs
torch, torchaudio, transformers, tokenizers, safetensors, soundfile and numpy; the features below need more, and
importing one whose packages are missing says which extra installs them (setup.cfg's `extras_require` lists the
same names)."""

import importlib.util


# extra -> (feature, the import names it needs). The pip names differ from the import names only for scikit-learn.
EXTRAS = {
    "train": ("training (m2d2_hf.training)", ("accelerate", "datasets")),
    "eval": ("evaluation (m2d2_hf.evaluation)", ("datasets", "sklearn")),
    "timeline": ("the timeline plot", ("matplotlib",)),
}
PIP_NAMES = {"sklearn": "scikit-learn"}


class MissingExtraError(ModuleNotFoundError):
    """A package of an optional extra is not installed; the message names the extra that installs it."""


def missing_packages(extra: str) -> list[str]:
    """The import names of `extra`'s packages that cannot be imported here (a name set to None in `sys.modules`
    counts as missing, as `import` treats it)."""
    return [name for name in EXTRAS[extra][1] if importlib.util.find_spec(name) is None]


def install_hint(extra: str) -> str:
    """The command that installs an extra. The package is installed from a clone until it has a release."""
    return f'pip install -e ".[{extra}]" in the m2d2_hf clone'


def require_extra(extra: str) -> None:
    """Raise `MissingExtraError` naming the command that installs `extra` (`install_hint`) unless all of its packages
    import."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras with import checks are {sorted(EXTRAS)}")
    missing = missing_packages(extra)
    if missing:
        feature = EXTRAS[extra][0]
        names = ", ".join(PIP_NAMES.get(name, name) for name in missing)
        raise MissingExtraError(
            f"{feature} needs {names}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"{install_hint(extra)}",
            name=missing[0],
        )
