"""Output folders that appear whole or not at all (the converter and the ONNX export write through these)."""

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuses, before any work, an output path that is a file, or a folder with files in it unless `overwrite`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(
            f"the output path {output_dir} is a file, not a folder: give the path of a new (or empty) folder"
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"the output folder {output_dir} is not empty: choose a new or empty folder, or pass overwrite=True "
            "(--overwrite) to replace it whole"
        )


@contextlib.contextmanager
def staged_folder(output_dir: Path) -> Iterator[Path]:
    """A hidden folder beside `output_dir` to write into; renamed to `output_dir` (replacing it whole) when the
    block succeeds, removed when it fails."""
    staging = output_dir.with_name(f".{output_dir.name}.{os.getpid()}.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a process of this id that was killed
    staging.mkdir(parents=True)
    try:
        yield staging
        replaced = staging.with_suffix(".replaced")
        if output_dir.exists():
            output_dir.rename(replaced)
        staging.rename(output_dir)
        shutil.rmtree(replaced, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
