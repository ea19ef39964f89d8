"""The accelerate pieces every M2D2 training program shares: the process set-up, an endless epoch-aware batch
stream that resumes at the exact batch, per-step random generators, step checkpoints, trackers and progress, and
the optimisation loop (`run_training`), which takes the shared settings, the prepared run (`TrainingRun`) and what
the program adds to each step (a `Stage`).

Resuming is step-exact because everything random that a step uses is either derived from (seed, step, process)
or restored from the checkpoint (model, optimiser, the stream's epoch and position; see `checkpoint`), and the
learning rate is a function of the step.

One output folder holds one run: a new run refuses a folder that holds an earlier run's `metrics.jsonl` or `step_N`
checkpoints (`build_accelerator`), and a resumed run drops the metric lines past its checkpoint's step, which it
logs again (`start_run`), so that `metrics.jsonl` stays one history. A step whose loss or gradient norm is NaN or
Inf stops the run before it touches the weights (`NonFiniteStepError`), or with `--skip_nonfinite_steps` is skipped
and counted (`skipped_steps`); weights or statistics that are not finite are never checkpointed or exported.
"""

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, get_available_trackers
from accelerate.utils import DistributedType, LoggerType, gather_object, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..cpu_inference import cpu_has_native_bf16
from ..feature_extraction_m2d2 import M2D2FeatureExtractor
from ..host_memory import keep_freed_memory_mapped
from ..model_card import ModelCardInfo, training_card_info
from .arguments import TrainingSettings
from .checkpoint import (
    check_distributed_type,
    checkpoint_folders,
    load_checkpoint,
    require_finite,
    save_checkpoint,
)
from .optim import clip_grad_norm_


logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Item ids a non-finite step names (the rest are counted).
_SHOWN_IDS = 20


class NonFiniteStepError(RuntimeError):
    """An optimiser step whose loss or gradient norm is NaN or Inf; the run stops before the step is applied."""


class JSONLTracker(GeneralTracker):
    """Writes every logged dict as one JSON line (`<output_dir>/metrics.jsonl`): a tracker with no dependency that
    scripts and tests can read back."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name: str, logging_dir: str | os.PathLike):
        super().__init__()
        self.run_name = run_name
        self.path = Path(logging_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        (self.path.parent / "run_config.json").write_text(json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, **values}, default=float) + "\n")

    def drop_after(self, step: int) -> int:
        """Keeps only the lines of steps up to `step`, the step a run resumes at (the later ones are logged again),
        and drops unreadable lines (the cut-off last line of a killed run); rewrites the file whole. Returns how
        many lines were dropped."""
        if not self.path.is_file():
            return 0
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
        if len(kept) < len(lines):
            partial = self.path.with_name(f".{self.path.name}.partial")
            partial.write_text("".join(line + "\n" for line in kept))
            os.replace(partial, self.path)
        return len(lines) - len(kept)


def _logged_step(line: str) -> int | None:
    """The step of a metrics line (None: unreadable, or without a step)."""
    try:
        logged = json.loads(line)
    except ValueError:
        return None
    step = logged.get("step") if isinstance(logged, dict) else None
    return step if isinstance(step, int) else None


def refuse_mixed_runs(settings: TrainingSettings) -> None:
    """Stops a new run (no `--resume_from_checkpoint`) whose output folder holds an earlier run: its metric lines
    and checkpoints would mix with the new run's (`latest` could resume the earlier run's last step). Refusing, as
    transformers' example scripts refuse a non-empty output folder, loses nothing; moving files aside on the
    user's behalf would."""
    if settings.resume_from_checkpoint is not None:
        return
    output_dir = Path(settings.output_dir)
    earlier = [METRICS_FILE] if (output_dir / METRICS_FILE).is_file() else []
    earlier += sorted(p.name for p in checkpoint_folders(output_dir))
    if earlier:
        shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise ValueError(
            f"--output_dir {output_dir} holds an earlier run ({shown}), which a new run would mix with its own: "
            "continue it with --resume_from_checkpoint latest, or give another --output_dir (or remove that run)"
        )


def tracker_names(report_to: str) -> list[str]:
    """The `--report_to` trackers, refused before any training when accelerate does not know one or its package
    is not installed (accelerate would drop it with no more than a log line, and the run would log nothing)."""
    names = [name.strip() for name in report_to.split(",") if name.strip() and name.strip() != "none"]
    known = {str(kind) for kind in LoggerType}
    available = {str(kind) for kind in get_available_trackers()}
    for name in names:
        if name in ("jsonl", "all"):
            continue
        if name not in known:
            raise ValueError(
                f"--report_to {name!r} is not a tracker: choose from jsonl, {', '.join(sorted(known))} "
                "(comma-separated)"
            )
        if name not in available:
            hint = "pip install 'm2d2-hf[train]'" if name == "tensorboard" else f"pip install {name}"
            raise ValueError(
                f"--report_to {name}: the {name} package is not installed, so nothing would be logged to it: {hint}, "
                "or leave it out of --report_to (jsonl needs nothing)"
            )
    return names


def build_accelerator(settings: TrainingSettings) -> Accelerator:
    """The Accelerator of a run: trackers from `--report_to` (jsonl writes `metrics.jsonl` in the output folder),
    and gradient accumulation that makes per-device batch × processes × accumulation the global batch. Seeds every
    RNG with `--seed` and creates the output folder (after the trackers and the folder are checked: a new run
    refuses a folder holding an earlier run, `refuse_mixed_runs`). On the CPU, freed tensor memory stays mapped for
    the next step (`host_memory`: 1.16x per ViT-B stage-1 step)."""
    names = tracker_names(settings.report_to)
    refuse_mixed_runs(settings)
    trackers: list[Any] = [JSONLTracker("m2d2", settings.output_dir) if n == "jsonl" else n for n in names]
    accelerator = Accelerator(log_with=trackers or None, project_dir=settings.output_dir)
    check_distributed_type(accelerator)
    refuse_emulated_bf16(accelerator)
    # Known only once the processes are set up, hence set after construction.
    accelerator.gradient_accumulation_steps = accumulation_steps(
        settings.global_batch_size, settings.per_device_train_batch_size, accelerator.num_processes
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
    )
    set_seed(settings.seed)
    if accelerator.device.type == "cpu" and keep_freed_memory_mapped():
        logger.info("CPU training: glibc malloc keeps freed tensor memory mapped (no page faults between steps)")
    if accelerator.is_main_process:
        Path(settings.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return accelerator


def refuse_emulated_bf16(accelerator: Accelerator) -> None:
    """Stops a bf16 mixed-precision run on a CPU that has no native bf16 (AVX512-BF16 or AMX, `cpu_has_native_bf16`):
    bf16 autocast runs emulated there, several times slower than float32, so the run would only be slower."""
    if accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16" and not cpu_has_native_bf16():
        raise ValueError(
            "bf16 mixed precision on this CPU would run emulated (it has no AVX512-BF16 or AMX), several times "
            "slower than float32: train in float32 (accelerate launch --mixed_precision no, or "
            "ACCELERATE_MIXED_PRECISION=no)"
        )


def accumulation_steps(global_batch: int, per_device_batch: int, num_processes: int) -> int:
    """Micro-batches per optimiser step so that per_device × processes × steps equals the global batch."""
    per_pass = per_device_batch * num_processes
    if global_batch % per_pass:
        raise ValueError(
            f"--global_batch_size {global_batch} is not a multiple of per-device batch {per_device_batch} × "
            f"{num_processes} processes: choose sizes that divide it"
        )
    return global_batch // per_pass


def step_seed(seed: int, step: int, process_index: int, purpose: str) -> int:
    """A seed that depends only on (seed, step, process, purpose)."""
    digest = hashlib.sha256(f"{seed}/{step}/{process_index}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, process_index: int, purpose: str, device: str = "cpu") -> torch.Generator:
    """A generator that depends only on (seed, step, process, purpose): a resumed run draws what the
    uninterrupted run drew at the same step."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, process_index, purpose))


class BatchStream:
    """Endless batches from a DataLoader over a streamed dataset, one epoch (pass) after another, reshuffled per
    epoch with `set_epoch`. Registered for checkpointing, it restores its epoch and position, and re-reading the
    consumed batches of that epoch puts a resumed run on the very next batch.

    Each process reads its own shards, so positions differ between processes; the main process writes the
    checkpoint's state, hence `state_dict` gathers every process's position (all processes call it when saving;
    the keys are strings, as JSON has them) and `load_state_dict` takes this process's entry."""

    def __init__(self, dataloader: DataLoader, process_index: int = 0):
        self.dataloader = dataloader
        self.process_index = process_index
        self.epoch = 0
        self.batches_in_epoch = 0
        self._skip = 0

    def state_dict(self) -> dict:
        positions = gather_object([(self.process_index, self.epoch, self.batches_in_epoch)])
        return {"positions": {str(rank): [epoch, batches] for rank, epoch, batches in positions}}

    def load_state_dict(self, state: dict) -> None:
        if str(self.process_index) not in state["positions"]:
            raise ValueError(
                f"the checkpoint holds stream positions of processes {sorted(state['positions'])}, not of process "
                f"{self.process_index}: resume with the same number of processes"
            )
        epoch, batches = state["positions"][str(self.process_index)]
        self.epoch, self.batches_in_epoch, self._skip = int(epoch), int(batches), int(batches)

    def __iter__(self) -> Iterator[dict]:
        while True:
            dataset = self.dataloader.dataset
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.epoch)
            produced = usable = 0
            for batch in self.dataloader:
                produced += 1
                usable += batch["waveforms"].shape[0]
                if self._skip:
                    self._skip -= 1
                    continue
                self.batches_in_epoch += 1
                yield batch
            if produced == 0:
                raise RuntimeError("the training stream is empty: check --train_data, --split and --filter")
            if usable == 0:  # else the run would skip broken items forever
                raise RuntimeError(
                    f"every item of the training stream was skipped as undecodable or too loud ({produced} batches): "
                    "check that the audio paths of --train_data resolve and that the files are audio in [-1, 1]"
                )
            self.epoch += 1
            self.batches_in_epoch = 0


class RunState:
    """What a resumed run must get back besides weights, optimiser and stream: the skipped-item and skipped-step
    totals and the log-mel statistics the run normalises with. Saved in the checkpoint's `trainer_state.json`."""

    def __init__(self, norm_stats: list[float] | None = None):
        self.skipped_items = 0
        self.skipped_steps = 0
        self.norm_stats = norm_stats

    def state_dict(self) -> dict:
        return {
            "skipped_items": self.skipped_items,
            "skipped_steps": self.skipped_steps,
            "norm_stats": self.norm_stats,
        }

    def load_state_dict(self, state: dict) -> None:
        self.skipped_items = int(state["skipped_items"])
        self.skipped_steps = int(state.get("skipped_steps", 0))  # absent from checkpoints of earlier versions
        self.norm_stats = state["norm_stats"]


def parse_filters(filters: list[str]):
    """`COLUMN=VALUE` strings → a row predicate for the stream (None when there are none)."""
    pairs = []
    for item in filters:
        column, sep, value = item.partition("=")
        if not sep or not column:
            raise ValueError(f"--filter expects COLUMN=VALUE, got {item!r}")
        pairs.append((column, value))
    if not pairs:
        return None
    return RowFilter(pairs)


class RowFilter:
    """Picklable row predicate (dataloader workers receive it)."""

    def __init__(self, pairs: list[tuple[str, str]]):
        self.pairs = pairs

    def __call__(self, row: dict) -> bool:
        return all(str(row.get(column)) == value for column, value in self.pairs)


class Throughput:
    """Clips per second between two log points."""

    def __init__(self):
        self.clips, self.start = 0, time.perf_counter()

    def add(self, clips: int) -> None:
        self.clips += clips

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        rate = self.clips / elapsed if elapsed > 0 else math.nan
        self.clips, self.start = 0, time.perf_counter()
        return rate


EXPORT_REQUEST_FILE = "EXPORT_NOW"


def export_requested(export_steps: int, step: int, output_dir: Path) -> bool:
    """Every `export_steps` steps, or once when a file named EXPORT_NOW appears in the output folder."""
    request = output_dir / EXPORT_REQUEST_FILE
    if request.exists():
        request.unlink(missing_ok=True)
        return True
    return bool(export_steps) and step % export_steps == 0


def next_batch(batches: Iterator[dict]) -> tuple[dict, int]:
    """The next batch that kept at least one item, and how many items were skipped on the way."""
    batch = next(batches)
    skipped = batch["num_skipped"]
    while batch["waveforms"].shape[0] == 0:  # every item of it was undecodable
        batch = next(batches)
        skipped += batch["num_skipped"]
    return batch, skipped


@dataclass
class ExportCard:
    """What the model card of every export of a run says: the program, the run's settings (`settings_record`) and
    the model folders it started from (None entries: new weights)."""

    program: str
    record: Mapping[str, Any]
    sources: list[str | None]

    def info(self, step: int) -> ModelCardInfo:
        return training_card_info(self.program, self.record, self.sources, step)


class Stage(Protocol):
    """What a training program adds to the shared loop.

    `loss_names`: fields of the model output that are logged (the first one is shown on the progress bar);
    `description`: the progress bar's label; `allow_uncaptioned`: for contrastive stages, whether a run whose first
    step finds a caption for none of its clips goes on (None: the program has no such option, and stops)."""

    loss_names: tuple[str, ...]
    description: str
    allow_uncaptioned: bool | None

    def make_inputs(self, batch: dict, step: int, micro: int) -> dict:
        """The model's keyword arguments for micro-batch `micro` of optimiser step `step`."""

    def after_step(self, step: int) -> dict:
        """Runs after the optimiser step `step` (EMA, temperature clamp, evaluation, ...); returns values to log."""

    def export(self, folder: Path, step: int) -> None:
        """Saves the model of step `step` as a `from_pretrained` folder."""


@dataclass
class TrainingRun:
    """The prepared objects of a run and the step it starts at (0, or the checkpoint's step when resuming)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stream: BatchStream
    state: RunState
    start_step: int = 0

    def save_checkpoint(self, accelerator: Accelerator, folder: Path, step: int) -> None:
        save_checkpoint(accelerator, folder, step, self.model, self.optimizer, self.stream, self.state)


def clip_gradients(accelerator: Accelerator, model: torch.nn.Module, max_norm: float) -> torch.Tensor | None:
    """Clips the gradients to a total 2-norm of `max_norm` and returns the norm before clipping: on the CPU (one
    process or DDP over gloo, where accelerate unscales and calls torch's clipping) without the pass that multiplies
    them by 1 (`optim.clip_grad_norm_`), through accelerate elsewhere (FSDP, DeepSpeed and XLA clip their own way)."""
    if accelerator.device.type == "cpu" and accelerator.distributed_type in (
        DistributedType.NO,
        DistributedType.MULTI_CPU,
    ):
        accelerator.unscale_gradients()
        return clip_grad_norm_(model.parameters(), max_norm)
    return accelerator.clip_grad_norm_(model.parameters(), max_norm)


def step_gradient_norm(accelerator: Accelerator, model: torch.nn.Module, max_grad_norm: float) -> torch.Tensor | None:
    """The total gradient norm of the step, its gradients clipped to `max_grad_norm` when > 0 (without clipping
    the norm is still measured, one pass over the gradients, so that NaN/Inf gradients are seen). None under fp16's
    GradScaler: Inf/NaN gradients are its business there (it skips those steps and lowers its scale)."""
    norm = clip_gradients(accelerator, model, max_grad_norm) if max_grad_norm > 0 else None
    if accelerator.scaler is not None:
        return None
    if norm is None:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    return norm


def is_nonfinite_step(accelerator: Accelerator, losses: list[torch.Tensor], grad_norm: torch.Tensor | None) -> bool:
    """Whether a loss of the step on any process, or the gradient norm, is NaN or Inf: one small all-reduce, so
    that every process takes the same decision."""
    bad = (~torch.isfinite(torch.stack(losses))).any()
    if grad_norm is not None:
        bad = bad | ~torch.isfinite(grad_norm.to(bad.device))
    return bool(accelerator.reduce(bad.float(), "sum") > 0)


def nonfinite_step_report(
    accelerator: Accelerator, step: int, losses: list[torch.Tensor], ids: list[list[str]], grad_norm
) -> str:
    """What went wrong at optimiser step `step` (counted from 1) and with which items: the clips of the micro-batches
    whose loss is not finite, or (finite losses, non-finite gradients) every clip of the step, over all processes."""
    values = [float(loss) for loss in losses]
    suspects = [item for value, batch in zip(values, ids) if not math.isfinite(value) for item in batch]
    everything = [item for batch in ids for item in batch]
    gathered = gather_object([(suspects, everything, [v for v in values if not math.isfinite(v)])])
    suspects = [item for shard in gathered for item in shard[0]]
    bad_losses = [value for shard in gathered for value in shard[2]]
    if bad_losses:
        what, items = f"the loss is {bad_losses[0]}", suspects
    else:
        what, items = f"the gradient norm is {float(grad_norm)}", [item for shard in gathered for item in shard[1]]
    more = f" and {len(items) - _SHOWN_IDS} more" if len(items) > _SHOWN_IDS else ""
    return f"optimiser step {step}: {what}, with the items {items[:_SHOWN_IDS]}{more} of its batch"


def skip_optimizer_step(accelerator: Accelerator) -> None:
    """Leaves weights and optimiser state as they are (the caller drops the gradients). fp16's GradScaler gets the
    update it needs after unscaling, with its scale lowered as after an overflow."""
    scaler = accelerator.scaler
    if scaler is not None:
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())


def run_training(accelerator: Accelerator, settings: TrainingSettings, run: TrainingRun, stage: Stage) -> Path:
    """The optimisation loop shared by the training programs.

    Per optimiser step: `gradient_accumulation_steps` micro-batches (`stage.make_inputs(batch, step, micro)` → model
    kwargs; the model output's `loss` is back-propagated and the `stage.loss_names` fields are logged), gradient
    clipping, the optimiser, the scheduler, then `stage.after_step(step)` (its values are logged). Logs through the
    accelerate trackers, checkpoints (`checkpoint.save_checkpoint`) every `checkpointing_steps`, exports with
    `stage.export(folder, step)` every `export_steps` or on request, and at the end. Returns the final export
    folder.

    Inputs with a `has_caption` mask (contrastive training) add `uncaptioned_clips`, the clips of each logging
    window that had no caption, to the logs; when no clip of the run's first step has one, the captions do not
    belong to the clips (e.g. other ids) and the run stops, unless `stage.allow_uncaptioned`.

    A step whose loss (on any process) or gradient norm is NaN or Inf raises `NonFiniteStepError`, naming the step
    and the items of its batch, before the optimiser applies it; with `--skip_nonfinite_steps` the optimiser step is
    skipped instead (the schedule and the stream go on) and counted in `skipped_steps`. Checkpoints and exports
    refuse weights or norm_stats that are not finite (`checkpoint.require_finite`).
    """
    output_dir, total_steps, loss_names = Path(settings.output_dir), settings.max_train_steps, stage.loss_names
    model, optimizer, scheduler, state = run.model, run.optimizer, run.scheduler, run.state
    batches, throughput = iter(run.stream), Throughput()
    progress = tqdm(
        total=total_steps,
        initial=run.start_step,
        disable=not accelerator.is_local_main_process,
        desc=stage.description,
    )
    device = accelerator.device
    captioned_inputs, window_uncaptioned = False, 0
    for step in range(run.start_step, total_steps):
        sums = torch.zeros(len(loss_names) + 3, device=device)  # the losses, uncaptioned clips, clips, skipped items
        step_losses, step_ids = [], []
        for micro in range(accelerator.gradient_accumulation_steps):
            batch, skipped = next_batch(batches)
            # The global RNG (dropout, e.g. of a text tower) restarts from a per-step seed: a resumed run must not
            # depend on what else drew from it (DataLoader iterators do, once per epoch and on resume).
            torch.manual_seed(step_seed(settings.seed, step, accelerator.process_index, f"global{micro}"))
            inputs = stage.make_inputs(batch, step, micro)
            captioned_inputs = "has_caption" in inputs
            uncaptioned = (
                (~inputs["has_caption"]).sum().float() if captioned_inputs else torch.zeros((), device=device)
            )
            with accelerator.accumulate(model):
                out = model(**inputs)
                accelerator.backward(out.loss)
                step_losses.append(out.loss.detach().float())
                step_ids.append(batch["ids"])
                skip = False
                if accelerator.sync_gradients:
                    grad_norm = step_gradient_norm(accelerator, model, settings.max_grad_norm)  # 0: no clipping
                    if is_nonfinite_step(accelerator, step_losses, grad_norm):
                        report = nonfinite_step_report(accelerator, step + 1, step_losses, step_ids, grad_norm)
                        if not settings.skip_nonfinite_steps:
                            raise NonFiniteStepError(
                                f"{report}: stopped before applying it; check those items' audio or lower the "
                                "learning rate, then resume from the last step_N checkpoint, or pass "
                                "--skip_nonfinite_steps to skip such steps"
                            )
                        logger.warning(f"{report}: skipped (--skip_nonfinite_steps)")
                        state.skipped_steps += 1
                        skip = True
                if skip:
                    skip_optimizer_step(accelerator)
                else:
                    optimizer.step()
                optimizer.zero_grad()
            values = [getattr(out, name) for name in loss_names]
            values = [v.detach().float() if v is not None else torch.zeros((), device=device) for v in values]
            counts = [uncaptioned.to(device), torch.tensor(float(len(batch["ids"])), device=device)]
            sums += torch.stack(values + counts + [torch.tensor(float(skipped), device=device)])
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        extra = stage.after_step(step)
        done = step + 1

        totals = accelerator.reduce(sums, "sum")
        state.skipped_items += int(totals[-1])
        throughput.add(int(totals[-2]))
        window_uncaptioned += int(totals[-3])
        if captioned_inputs and step == run.start_step and totals[-3] == totals[-2]:
            require_captions(stage.allow_uncaptioned, int(totals[-2]))
        progress.update(1)
        if done % settings.logging_steps == 0 or done == total_steps:
            micro_batches = accelerator.gradient_accumulation_steps * accelerator.num_processes
            logged = {name: float(total) / micro_batches for name, total in zip(loss_names, totals)}
            logged.update(lr=lr, skipped_items=state.skipped_items, skipped_steps=state.skipped_steps)
            logged.update(clips_per_second=throughput.rate(), **extra)
            if captioned_inputs:
                logged["uncaptioned_clips"], window_uncaptioned = window_uncaptioned, 0
            accelerator.log(logged, step=done)
            progress.set_postfix(loss=f"{logged[loss_names[0]]:.4f}", skipped=state.skipped_items)
        if done % settings.checkpointing_steps == 0 and done < total_steps:
            run.save_checkpoint(accelerator, output_dir / f"step_{done}", done)
        if export_requested(settings.export_steps, done, output_dir):
            checked_export(accelerator, run, stage, output_dir / f"export_step_{done}", done)
    progress.close()

    run.save_checkpoint(accelerator, output_dir / f"step_{total_steps}", total_steps)
    final = output_dir / "final"
    checked_export(accelerator, run, stage, final, total_steps)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def checked_export(accelerator: Accelerator, run: TrainingRun, stage: Stage, folder: Path, step: int) -> None:
    """`stage.export`, refused when the weights or the run's norm_stats are not finite."""
    require_finite(accelerator.unwrap_model(run.model), run.state.norm_stats, folder)
    stage.export(folder, step)


def streamed_loader(
    settings: TrainingSettings,
    accelerator: Accelerator,
    feature_extractor: M2D2FeatureExtractor,
    *,
    data: str | None = None,
    split: str | None = None,
    filter_fn=None,
    batch_size: int | None = None,
    shuffle_buffer: int | None = None,
    keep_columns: list[str] | tuple[str, ...] = (),
    min_samples: int = 0,
    seed: int | None = None,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader over this process's share of a decoded audio stream (the run's data settings unless
    overridden) at the feature extractor's rate, collated into zero-padded waveform batches with broken items and
    items too loud for its log-mel (above its `max_peak`) skipped and counted."""
    from .data import AudioBatchCollator, load_audio_stream

    dataset = load_audio_stream(
        data or settings.train_data,
        split=split or settings.split,
        audio_column=settings.audio_column,
        id_column=settings.id_column,
        keep_columns=list(keep_columns),
        max_seconds=settings.max_seconds,
        sampling_rate=feature_extractor.sampling_rate,
        shuffle_buffer=settings.shuffle_buffer if shuffle_buffer is None else shuffle_buffer,
        seed=settings.seed if seed is None else seed,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        filter_fn=parse_filters(settings.filter) if filter_fn is None else filter_fn,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size or settings.per_device_train_batch_size,
        collate_fn=AudioBatchCollator(
            min_samples=min_samples, keep_columns=list(keep_columns), max_peak=feature_extractor.max_peak
        ),
        num_workers=settings.dataloader_num_workers,
        drop_last=drop_last,
    )


def require_captions(allow_uncaptioned: bool | None, clips: int) -> None:
    """Stops a contrastive run whose first step found a caption for none of its clips, unless allowed (None: the
    program has no `--allow_uncaptioned`)."""
    if allow_uncaptioned:
        logger.warning(f"none of the {clips} clips of the first step has a caption: training without the CLAP term")
        return
    fix = "fix the ids"
    if allow_uncaptioned is not None:
        fix += ", or pass --allow_uncaptioned to train without captions"
    raise ValueError(
        f"none of the {clips} clips of the first step has a caption, so the contrastive loss is 0 and learns nothing: "
        "the caption ids do not match the clip ids of --train_data (by default the audio file stem; see --id_column), "
        f"or the captions are empty; {fix}"
    )


def start_run(
    accelerator: Accelerator, run: TrainingRun, checkpoint: str | None, project: str, record: Mapping[str, Any]
) -> None:
    """Restores the prepared model and optimiser, the scheduler, stream and run state from `checkpoint` when
    resuming (`run.start_step` becomes its step), and opens the trackers with the run's settings (`record`).
    `metrics.jsonl` keeps only the lines up to the start step: the run logs the later steps again (a run that
    starts at 0 here was let into a folder with metrics by `--resume_from_checkpoint latest_or_new`, and redoes the
    earlier attempt, which left no checkpoint)."""
    if checkpoint:
        run.start_step = load_checkpoint(
            accelerator, checkpoint, run.model, run.optimizer, run.scheduler, run.stream, run.state
        )
        logger.info(f"resumed from {checkpoint} at step {run.start_step}")
    accelerator.init_trackers(project, {key: value for key, value in record.items() if value is not None})
    for tracker in accelerator.trackers:  # only the main process has them
        if isinstance(tracker, JSONLTracker) and (dropped := tracker.drop_after(run.start_step)):
            logger.info(
                f"{tracker.path}: dropped {dropped} lines past step {run.start_step}, logged again by this run"
            )
