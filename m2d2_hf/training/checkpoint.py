"""Step checkpoints of the training programs: written atomically, read without unpickling anything.

A checkpoint is a `step_N` folder holding only safetensors and JSON files:

- `model.safetensors`: the weights of the trained module (EMA target, predictor, heads included);
- `optimizer.safetensors`: the optimiser's state tensors, its parameter groups as JSON metadata;
- `rng_state_<process>.safetensors`: each process's Python, NumPy, torch (and CUDA) generator states;
- `trainer_state.json`: the step, every process's stream position, the run state (skipped items, norm_stats) and,
  under fp16, the gradient scaler;
- `checkpoint_complete.json`, written last: only a folder holding it is a checkpoint.

accelerate's `save_state` / `load_state` are not used: they pickle the scheduler, the registered objects and the
generator states, and load registered objects with `weights_only=False`, so a replaced file could run code on
resume. The folder is assembled under a hidden name beside its final one and renamed into place once complete, so
a run killed while saving leaves either the previous checkpoints or the new, complete one; `latest` only takes
folders with the completion marker.

The learning-rate schedule is not stored: it is a function of the step and of the run's flags, so a run resumed
with another `--max_train_steps` follows the schedule of its new total from the checkpoint's step on.
"""

import json
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model


logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"step_(\d+)")
FORMAT_VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"
COMPLETE_MARKER = "checkpoint_complete.json"
# Distributed set-ups whose model and optimiser state are sharded: the unwrapped module's state dict is not the
# whole model there.
UNSUPPORTED = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the file and what to do."""


def rng_file(process_index: int) -> str:
    return f"rng_state_{process_index}.safetensors"


def check_distributed_type(accelerator: Accelerator) -> None:
    """Refuses set-ups whose sharded state these checkpoints cannot hold, before any training."""
    if accelerator.distributed_type in UNSUPPORTED:
        raise ValueError(
            f"{accelerator.distributed_type.value} runs are not supported: the step checkpoints hold whole, "
            "unsharded models; launch a single process or multi-GPU/multi-CPU data parallelism (DDP) instead"
        )


def _fsync(path: Path) -> None:
    """Flushes a file or folder to disk, so that the rename that publishes a checkpoint follows its contents."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _write_json(path: Path, value: dict) -> None:
    with path.open("w") as handle:
        json.dump(value, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, path, metadata=metadata)
    _fsync(path)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """An optimiser state dict as flat tensors (`state.<param>.<name>`) and JSON metadata (parameter groups and
    any non-tensor state)."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value
            else:
                plain[f"{index}.{name}"] = value
    return tensors, {"param_groups": json.dumps(state["param_groups"]), "plain_state": json.dumps(plain)}


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """The inverse of `optimizer_tensors`: restores the state written to `path`."""
    tensors = load_file(path)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
    groups = json.loads(metadata["param_groups"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in json.loads(metadata["plain_state"]).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    # JSON turns tuples (AdamW's betas) into lists: give them back the type the optimiser was built with.
    for group, current in zip(groups, optimizer.param_groups):
        for name, value in group.items():
            if isinstance(current.get(name), tuple) and isinstance(value, list):
                group[name] = tuple(value)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """This process's Python, NumPy, torch and CUDA generator states as tensors and JSON metadata."""
    version, python_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    tensors = {
        "python": torch.tensor(python_state, dtype=torch.int64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        tensors.update({f"cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    metadata = {"python": json.dumps([version, gauss]), "numpy": json.dumps([kind, position, has_gauss, cached])}
    return tensors, metadata


def restore_rng(path: Path) -> None:
    tensors = load_file(path)
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata() or {}
    version, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(tensors["python"].tolist()), gauss))
    kind, position, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda_{i}"] for i in range(sum(name.startswith("cuda_") for name in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def require_finite(module: torch.nn.Module, norm_stats: list[float] | None, destination: str | os.PathLike) -> None:
    """Refuses to write `destination` (a checkpoint or an export) from weights or log-mel statistics that hold NaN
    or Inf: such a model computes nothing but NaN, yet `latest` and `from_pretrained` would take it for a good one."""
    if norm_stats is not None and not all(math.isfinite(float(value)) for value in norm_stats):
        raise ValueError(
            f"refusing to write {destination}: its norm_stats {list(norm_stats)} are not finite, so every feature "
            "would be NaN; recompute them from the training audio or give finite ones (stage 1: --norm_stats MEAN STD)"
        )
    tensors = {name: t for name, t in module.state_dict().items() if t.is_floating_point() or t.is_complex()}
    if not tensors:
        return
    finite = torch.stack([torch.isfinite(t).all() for t in tensors.values()]).tolist()  # one read-back
    bad = [name for name, ok in zip(tensors, finite) if not ok]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise ValueError(
            f"refusing to write {destination}: {len(bad)} of {len(tensors)} tensors hold NaN or Inf ({shown}), the "
            "run diverged; resume from an earlier step_N checkpoint with a lower learning rate, or check the data"
        )


def save_checkpoint(
    accelerator: Accelerator,
    folder: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stream,
    state,
) -> Path:
    """Writes the `step_N` checkpoint `folder` atomically (all processes call it): a hidden `.step_N.partial`
    folder gets every file, the completion marker last, and is then renamed to `folder`, replacing an older one
    of the same step whole. Weights or norm_stats that are not finite are refused (`require_finite`)."""
    folder = Path(folder)
    require_finite(accelerator.unwrap_model(model), getattr(state, "norm_stats", None), folder)
    partial = folder.with_name(f".{folder.name}.partial")
    stream_state = stream.state_dict()  # a collective: every process takes part
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save_tensors(partial / rng_file(accelerator.process_index), *rng_tensors())
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(partial / MODEL_FILE), metadata={"format": "pt"})
        _fsync(partial / MODEL_FILE)
        _save_tensors(partial / OPTIMIZER_FILE, *optimizer_tensors(optimizer))
        trainer_state = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "num_processes": accelerator.num_processes,
            "stream": stream_state,
            "run": state.state_dict(),
            "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        }
        _write_json(partial / TRAINER_STATE_FILE, trainer_state)
    accelerator.wait_for_everyone()  # every process's generator state is on disk
    if accelerator.is_main_process:
        _write_json(partial / COMPLETE_MARKER, {"format_version": FORMAT_VERSION, "step": step})
        _fsync(partial)
        stale = folder.with_name(f".{folder.name}.replaced")
        shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():
            folder.rename(stale)
        partial.rename(folder)
        _fsync(folder.parent)
        shutil.rmtree(stale, ignore_errors=True)
        logger.info(f"saved checkpoint {folder}")
    accelerator.wait_for_everyone()
    return folder


def _read(folder: Path, name: str, reader):
    """`reader(path)`, with any failure turned into an error that names the file."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(
            f"cannot resume from {folder}: {name} is missing; resume from another step_N folder of the run"
        )
    try:
        return reader(path)
    except Exception as error:
        raise CheckpointError(
            f"cannot resume from {folder}: {path} is not a valid {name} ({type(error).__name__}: {error}); the "
            "file is damaged or was not written by this program (nothing in a checkpoint is unpickled): resume from "
            "another step_N folder of the run"
        ) from error


def _read_json(path: Path) -> dict:
    value = json.loads(path.read_text())
    if not isinstance(value, dict) or value.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"expected a JSON object with format_version {FORMAT_VERSION}")
    return value


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Puts the scheduler (and its optimiser's learning rates) at `step` of this run's schedule, as if it had been
    stepped `step` times: the optimiser state of a checkpoint holds the rates of the run that wrote it."""
    scheduler.last_epoch = step
    rates = [base * rule(step) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates


def load_checkpoint(
    accelerator: Accelerator,
    folder: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    stream,
    state,
) -> int:
    """Restores a checkpoint written by `save_checkpoint` into the prepared model and optimiser, the scheduler
    (at the checkpoint's step of this run's schedule), the stream and the run state; returns the step."""
    folder = Path(folder)
    marker = _read(folder, COMPLETE_MARKER, _read_json)
    trainer_state = _read(folder, TRAINER_STATE_FILE, _read_json)
    step = int(CHECKPOINT_PATTERN.fullmatch(folder.name)[1])
    if marker.get("step") != step or trainer_state.get("step") != step:
        raise CheckpointError(
            f"cannot resume from {folder}: {COMPLETE_MARKER} and {TRAINER_STATE_FILE} are of steps "
            f"{marker.get('step')} and {trainer_state.get('step')}, not {step}; resume from a step_N folder as the "
            "run wrote it"
        )
    if trainer_state["num_processes"] != accelerator.num_processes:
        raise CheckpointError(
            f"{folder} was written by {trainer_state['num_processes']} processes, this run has "
            f"{accelerator.num_processes}: resume with the same number of processes"
        )
    _read(folder, MODEL_FILE, lambda path: load_model(accelerator.unwrap_model(model), str(path), strict=True))
    _read(folder, OPTIMIZER_FILE, lambda path: load_optimizer_tensors(optimizer, path))
    _read(folder, rng_file(accelerator.process_index), restore_rng)
    stream.load_state_dict(trainer_state["stream"])
    state.load_state_dict(trainer_state["run"])
    if accelerator.scaler is not None and trainer_state.get("grad_scaler") is not None:
        accelerator.scaler.load_state_dict(trainer_state["grad_scaler"])
    follow_schedule(scheduler, step)
    return step


def is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """The `step_N` folders in output_dir, complete or not."""
    return [p for p in Path(output_dir).glob("step_*") if CHECKPOINT_PATTERN.fullmatch(p.name) and p.is_dir()]


LATEST, LATEST_OR_NEW = "latest", "latest_or_new"


def resolve_checkpoint(resume_from: str | None, output_dir: str | os.PathLike) -> tuple[str | None, int]:
    """The checkpoint folder to resume from and its optimiser step (`step_N`); 'latest' picks the newest complete
    one in output_dir and refuses to go on when there is none (resuming was asked for: starting over would redo the
    run and log a second history), 'latest_or_new' starts a new run then (None, 0), for a command that is simply
    rerun after every interruption. A folder without the completion marker (a save that was interrupted, or a
    checkpoint of an earlier version of the package, which pickled its state) is never used."""
    if resume_from is None:
        return None, 0
    if resume_from in (LATEST, LATEST_OR_NEW):
        folders = checkpoint_folders(output_dir)
        complete = [p for p in folders if is_complete(p)]
        newest = max(complete, key=lambda p: int(CHECKPOINT_PATTERN.fullmatch(p.name)[1]), default=None)
        for ignored in sorted(set(folders) - set(complete)):
            logger.warning(f"ignoring {ignored}: it has no {COMPLETE_MARKER}, so it is not a complete checkpoint")
        if newest is None and resume_from == LATEST_OR_NEW:
            logger.info(
                f"no complete checkpoint in {output_dir}: a new run (--resume_from_checkpoint {LATEST_OR_NEW})"
            )
            return None, 0
        if newest is None:
            raise ValueError(
                f"--resume_from_checkpoint {LATEST}: {output_dir} holds no complete step_N checkpoint to resume from; "
                f"check --output_dir, or pass --resume_from_checkpoint {LATEST_OR_NEW} to start a new run when there "
                "is none"
            )
        resume_from = str(newest)
    path = Path(resume_from)
    match = CHECKPOINT_PATTERN.fullmatch(path.name)
    if match is None or not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from!r} is not a step_N folder written by this program")
    if not is_complete(path):
        raise ValueError(
            f"--resume_from_checkpoint {resume_from!r} has no {COMPLETE_MARKER}: its save was interrupted, or it was "
            "written by an earlier version of m2d2_hf (whose pickled state is not loaded, as pickles can run code); "
            "resume from a complete step_N folder or 'latest'"
        )
    return resume_from, int(match[1])
