"""The typed settings of the training programs: the options every program shares (`TrainingSettings`), and the
parsing of a program's settings dataclasses from the command line and a `--config` file (JSON or YAML).

The programs in `examples/` declare which dataclasses they read; each stage module (`stage1`, `stage2`,
`finetune`) holds its own settings next to the code that uses them. Flags are the field names with underscores
(`--train_data`); `HfArgumentParser` accepts the dashed spelling (`--train-data`) as well.
"""

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


def option(default: Any = dataclasses.MISSING, help: str = "", **argparse_keywords) -> Any:
    """A settings field with its help text (and any further argparse keywords, e.g. `metavar`)."""
    metadata = {"help": help, **argparse_keywords}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def repeatable(help: str, metavar: str) -> Any:
    """A list option that may be given several times (`--filter a=b --filter c=d`), each adding to the list."""
    return field(default_factory=list, metadata={"help": help, "metavar": metavar, "action": "extend"})


@dataclass
class TrainingSettings:
    """Data, optimisation, checkpointing and logging options shared by the training programs (the loop reads
    these). The defaults are stage 1's; the programs override a few (see their `*TrainingSettings`)."""

    train_data: str = option(help="audiofolder, Parquet/WebDataset shards, CSV list or hub id")
    output_dir: str = option(help="checkpoints, exports, metrics.jsonl")
    max_train_steps: int = option(help="optimiser steps of the run")
    split: str = option("train", help="split of train_data")
    audio_column: str = option("audio", help="column holding the audio")
    id_column: str | None = option(None, help="clip id column (None: the audio file stem)")
    filter: list[str] = repeatable("keep rows whose column equals value (repeatable)", "COLUMN=VALUE")
    max_seconds: float = option(30.0, help="audio is cut to this length (original: 30 s)")
    shuffle_buffer: int = option(10000, help="examples in the shuffle buffer (0: none)")
    dataloader_num_workers: int = option(2, help="decoding workers per process")

    global_batch_size: int = option(2048, help="clips per optimiser step (paper: 2048)")
    per_device_train_batch_size: int = option(
        64, help="clips per forward pass on each process; gradient accumulation makes up the global batch"
    )
    warmup_ratio: float = option(20 / 300, help="fraction of the steps for linear warm-up")
    weight_decay: float | None = option(0.05, help="AdamW weight decay (paper: 0.05)")
    adam_beta1: float = option(0.9, help="AdamW beta1")
    adam_beta2: float = option(0.95, help="AdamW beta2 (paper: 0.95)")
    max_grad_norm: float = option(3.0, help="gradient clipping (paper: 3.0; 0: off)")
    seed: int = option(7, help="run seed (paper's stage 1: 7)")

    checkpointing_steps: int = option(1000, help="checkpoint every N optimiser steps")
    resume_from_checkpoint: str | None = option(
        None,
        help="a step_N folder, or 'latest' (the newest complete one in output_dir); a larger --max_train_steps "
        "than the checkpointed run's continues on the schedule of the new total",
    )
    logging_steps: int = option(10, help="log every N optimiser steps")
    export_steps: int = option(0, help="also export the model every N steps (0: only at the end)")
    report_to: str = option(
        "jsonl",
        help="comma-separated trackers: jsonl, tensorboard, wandb, all (all installed ones); pip install "
        "'m2d2-hf[train]' installs tensorboard",
    )

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_ratio * self.max_train_steps)


def parse_settings(types: Sequence[type], argv: Sequence[str] | None = None, description: str = "") -> tuple:
    """One instance of each settings dataclass in `types`, from `argv` (default: `sys.argv[1:]`).

    `--config FILE` (a JSON or YAML mapping of option names to values) supplies options as if they came first on
    the command line, so options given on the command line override the file's (repeatable ones add to them)."""
    parser = HfArgumentParser(types, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="JSON or YAML file of option values")
    argv = list(sys.argv[1:] if argv is None else argv)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, default=None)
    path = config.parse_known_args(argv)[0].config
    if path is not None:
        argv = config_arguments(path, {action.dest for action in parser._actions}) + argv
    namespace = vars(parser.parse_args(argv))
    return tuple(kind(**{f.name: namespace[f.name] for f in dataclasses.fields(kind) if f.init}) for kind in types)


def config_arguments(path: Path, known: set[str]) -> list[str]:
    """The options of a JSON or YAML config file as command-line arguments, so that argparse converts and checks
    them as it does typed ones."""
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"--config {path}: cannot read it ({error.strerror})") from error
    values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(values, Mapping):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(values).__name__}")
    arguments = []
    for name, value in values.items():
        if name not in known or name in ("config", "help"):
            raise ValueError(f"--config {path}: {name!r} is not an option of this program (see --help)")
        if value is None:
            raise ValueError(f"--config {path}: {name} is null: leave it out to keep its default")
        items = value if isinstance(value, list) else [value]
        arguments += [f"--{name}", *(str(item).lower() if isinstance(item, bool) else str(item) for item in items)]
    return arguments


def settings_record(*settings: Any) -> dict[str, Any]:
    """Every option of a run, by name: what the trackers and the exported model cards record."""
    record: dict[str, Any] = {}
    for item in settings:
        record.update(dataclasses.asdict(item))
    return record
