"""transformers' own common test mixins, taken at test time from the sdist of the installed transformers version.

The mixins (`ModelTesterMixin`, `ConfigTester`, the feature-extraction, processor and pipeline mixins) are not in
the transformers wheel, only in its source distribution. `load_common_tests()` downloads the sdist of exactly the
installed version once (`pip download --no-deps --no-binary :all:`), extracts its `tests/` folder into a user cache
(`$XDG_CACHE_HOME/m2d2_hf/transformers-sdist-<version>`, or `M2D2_TRANSFORMERS_SDIST_CACHE`), writes the few
modules the sdist lacks, and imports the mixins from there. It raises `CommonTestsUnavailable` (the caller skips)
when the sdist cannot be had, e.g. offline.

The extracted `tests/` folder is imported as the package `transformers_common_tests` so that it cannot clash with
this project's own `tests` package; its relative imports (`from .test_modeling_common import ...`) still resolve.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers


PACKAGE = "transformers_common_tests"

# The sdist's tests/ modules the project runs: the model, config, feature-extraction (saving and sequence),
# processor and pipeline mixins.
COMMON_MODULES = (
    "test_modeling_common",
    "test_configuration_common",
    "test_feature_extraction_common",
    "test_sequence_feature_extraction_common",
    "test_processing_common",
    "test_pipeline_mixin",
)

# --- the stand-ins for what the sdist lacks (written here, not copied) ---

# tests/exporters/test_export.py: ModelTesterMixin inherits ExportTesterMixin. This stand-in keeps the export
# contract that matters to users: torch.export of every class gives the eager outputs.
_EXPORT_STAND_IN = '''
import torch


def _tensors(outputs):
    if isinstance(outputs, dict):
        outputs = outputs.to_tuple() if hasattr(outputs, "to_tuple") else tuple(outputs.values())
    flat = []
    for value in outputs:
        if isinstance(value, (tuple, list)):
            flat.extend(_tensors(value))
        elif isinstance(value, torch.Tensor):
            flat.append(value)
    return flat


class ExportTesterMixin:
    """Stand-in for transformers' tests/exporters/test_export.py (absent from the sdist): torch.export.export of
    each model class, static shapes, must reproduce the eager outputs."""

    def test_torch_export(self):
        if not self.test_torch_exportable:
            self.skipTest(reason="Model architecture is not torch.export exportable")
        config, inputs_dict = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config).eval()
            inputs = self._prepare_for_class(inputs_dict, model_class)
            inputs = {k: v for k, v in inputs.items() if k not in ("labels", "return_loss")}
            with torch.no_grad():
                eager = model(**inputs)
                exported = torch.export.export(model, args=(), kwargs=inputs, strict=False)
                replayed = exported.module()(**inputs)
            expected, actual = _tensors(eager), _tensors(replayed)
            self.assertEqual(len(expected), len(actual))
            for want, got in zip(expected, actual):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
'''

# tests/generation/test_utils.py: only used in `issubclass` checks (no M2D2 class generates).
_GENERATION_STAND_IN = '''
class GenerationTesterMixin:
    """Stand-in for transformers' tests/generation/test_utils.py (absent from the sdist)."""
'''

# tests/utils/test_configuration_utils.py: every common PreTrainedConfig field set to a non-default value, which
# ConfigTester checks each config class accepts and keeps.
_CONFIG_KWARGS_STAND_IN = """
config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
"""

# utils/fetch_hub_objects_for_ci.py: test_processing_common maps Hub URLs of sample media to local copies.
_FETCH_STAND_IN = '''
def url_to_local_path(url, return_url_if_not_found=True):
    """Stand-in for transformers' utils/fetch_hub_objects_for_ci.py: no local copies offline, the URL is kept."""
    return url
'''


class CommonTestsUnavailable(RuntimeError):
    """The sdist of the installed transformers could not be obtained (the reason is the message)."""


def cache_dir() -> Path:
    override = os.environ.get("M2D2_TRANSFORMERS_SDIST_CACHE")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "m2d2_hf" / f"transformers-sdist-{transformers.__version__}"


def _download_sdist(into: Path) -> Path:
    version = transformers.__version__
    # Flag / value pairs grouped as one would type them (fmt: skip keeps the groups on their lines).
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
        "--quiet", f"transformers=={version}", "-d", str(into),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        detail = getattr(error, "stderr", "") or str(error)
        raise CommonTestsUnavailable(
            f"could not download the transformers {version} sdist (needed for transformers' common test mixins; "
            f"is PyPI reachable?): {detail.strip().splitlines()[-1] if detail.strip() else error}"
        ) from error
    archives = sorted(into.glob("transformers-*.tar.gz"))
    if not archives:
        raise CommonTestsUnavailable(f"pip download left no transformers-{version}.tar.gz in {into}")
    return archives[0]


def _extract_tests(archive: Path, root: Path) -> None:
    """The sdist's tests/ → root/PACKAGE (plus stand-ins); root/tests/utils holds the tiny-model summary and
    root/src/transformers links the installed package, where test_pipeline_mixin looks for them."""
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.split("/")[1:2] == ["tests"] and (m.isfile() or m.isdir())]
        if not members:
            raise CommonTestsUnavailable(f"{archive.name} has no tests/ folder")
        tar.extractall(root / "_sdist", members=members, filter="data")
    (sdist_tests,) = (root / "_sdist").glob("*/tests")
    shutil.move(str(sdist_tests), root / PACKAGE)
    shutil.rmtree(root / "_sdist")

    package = root / PACKAGE
    for folder in (package, *(p for p in package.rglob("*") if p.is_dir())):
        (folder / "__init__.py").touch()
    stand_ins = {
        package / "exporters" / "test_export.py": _EXPORT_STAND_IN,
        package / "generation" / "test_utils.py": _GENERATION_STAND_IN,
        package / "utils" / "test_configuration_utils.py": _CONFIG_KWARGS_STAND_IN,
        root / "utils" / "fetch_hub_objects_for_ci.py": _FETCH_STAND_IN,
    }
    for path, text in stand_ins.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").touch()
        path.write_text(text.lstrip())
    # No Hub tiny models offline: an empty summary (test_pipeline_mixin reads it at import).
    summary = root / "tests" / "utils" / "tiny_model_summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text("{}")
    link_installed_transformers(root)


def link_installed_transformers(root: Path) -> None:
    """Points root/src/transformers at the transformers this interpreter imports. The cache outlives the virtual
    environment that built it (a CI clone's, deleted with the clone): a link left dangling failed the collection
    of every later run, so it is checked on every use and replaced atomically when it points elsewhere."""
    link, target = root / "src" / "transformers", Path(transformers.__file__).parent
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    link.parent.mkdir(exist_ok=True)
    temporary = link.with_name(f".transformers-{os.getpid()}")
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target, target_is_directory=True)
    os.replace(temporary, link)


def _has_common_modules(root: Path) -> bool:
    return all((root / PACKAGE / f"{name}.py").is_file() for name in COMMON_MODULES)


def prepare_sdist_tests() -> Path:
    """The cache root holding the importable PACKAGE, built once per transformers version."""
    root = cache_dir()
    if _has_common_modules(root):
        link_installed_transformers(root)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    # Built in a sibling temporary folder and renamed into place, so an interrupted run leaves no half cache.
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=root.name + ".tmp-") as scratch:
        scratch = Path(scratch)
        build = scratch / "build"
        build.mkdir()
        _extract_tests(_download_sdist(scratch), build)
        try:
            build.rename(root)
        except OSError:  # another process finished first
            if not _has_common_modules(root):
                raise
    return root


def load_common_tests() -> dict[str, ModuleType]:
    """Imports the common test modules of the installed transformers' sdist."""
    root = str(prepare_sdist_tests())
    if root not in sys.path:
        sys.path.append(root)
    return {name: importlib.import_module(f"{PACKAGE}.{name}") for name in COMMON_MODULES}


def see_registered_models_as_in_tree(modeling_common: ModuleType) -> None:
    """ModelTesterMixin tells base models (no loss: skipped by the training tests), audio classifiers (given
    labels) and pre-training models apart by looking the class name up in transformers' in-tree `*_MAPPING_NAMES`
    tables. Classes registered with the Auto classes (`AutoModel.register(...)`) are not in those tables, so the
    test module's copies are extended with them: the mixin then treats them as transformers treats the same Auto
    classes' in-tree models. transformers' own tables are left untouched."""
    from transformers.models.auto import modeling_auto

    for table in (
        "MODEL_MAPPING_NAMES",
        "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
        "MODEL_FOR_PRETRAINING_MAPPING_NAMES",
    ):
        mapping = getattr(modeling_auto, table.replace("_NAMES", ""))
        registered = {config.model_type: model.__name__ for config, model in mapping._extra_content.items()}
        setattr(modeling_common, table, {**getattr(modeling_common, table), **registered})
