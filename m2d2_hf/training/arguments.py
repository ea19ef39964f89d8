"""The typed settings of the training programs: the options every program shares (`TrainingSettings`), and the
parsing of a program's settings dataclasses from the command line and a `--config` file (JSON or YAML).

The programs in `examples/` declare which dataclasses they read; each stage module (`stage1`, `stage2`,
`finetune`) holds its own settings next to the code that uses them. Flags are the field names with underscores
(`--train_data`); `HfArgumentParser` accepts the dashed spelling (`--train-data`) as well.
"""

import argparse
import dataclasses
import json
import re
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
    skip_nonfinite_steps: bool = option(
        False,
        help="skip (and count as skipped_steps) an optimiser step whose loss or gradient norm is NaN/Inf; without "
        "it the run stops with an error naming the step and the items of its batch",
    )

    checkpointing_steps: int = option(1000, help="checkpoint every N optimiser steps")
    resume_from_checkpoint: str | None = option(
        None,
        help="a step_N folder, 'latest' (the newest complete one in output_dir; an error when there is none) or "
        "'latest_or_new' (that, or a new run when there is none: for a command rerun after every interruption); "
        "metrics.jsonl drops the lines past the resumed step. Without it, an output_dir holding an earlier run "
        "(metrics.jsonl, step_N) is refused. A larger --max_train_steps than the checkpointed run's continues on "
        "the schedule of the new total",
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


# A config file holds a few dozen options; a larger one is a mistake or an attack (a YAML alias bomb is small on disk
# but its expansion is not, which the flat-values rule below refuses).
MAX_CONFIG_BYTES = 1 << 20


def parse_settings(types: Sequence[type], argv: Sequence[str] | None = None, description: str = "") -> tuple:
    """One instance of each settings dataclass in `types`, from `argv` (default: `sys.argv[1:]`).

    `--config FILE` (a JSON or YAML mapping of option names to values) supplies options as if they came first on
    the command line, so options given on the command line override the file's (repeatable ones add to them). The
    file's values are converted and checked by the options' own types and choices, and are never read as options
    themselves (a list item "--output_dir" is a value)."""
    parser = HfArgumentParser(types, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="JSON or YAML file of option values")
    argv = list(sys.argv[1:] if argv is None else argv)
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, default=None)
    path = config.parse_known_args(argv)[0].config
    namespace = argparse.Namespace()
    if path is not None:
        for action, values in config_options(path, parser).items():
            try:
                apply_config_value(parser, action, values, namespace)
            except argparse.ArgumentError as error:
                parser.error(f"--config {path}: {error}")
            action.required = False  # given by the file; the command line may still override it
    namespace = vars(parser.parse_args(argv, namespace=namespace))
    return tuple(kind(**{f.name: namespace[f.name] for f in dataclasses.fields(kind) if f.init}) for kind in types)


def config_options(path: Path, parser: argparse.ArgumentParser) -> dict[argparse.Action, list[str]]:
    """The options of a JSON or YAML config file: each option's action with its values as strings (what the
    command line would give it). Names are spelled as on the command line (`train_data` or `train-data`).

    Raises:
        ValueError: naming the file (and the line, for a syntax error or a repeated key) and the fix.
    """
    values = read_config_file(path)
    if not isinstance(values, Mapping):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(values).__name__}")
    options: dict[argparse.Action, list[str]] = {}
    for name, value in values.items():
        action = parser._option_string_actions.get(f"--{name}")
        if action is None or action.dest in ("config", "help"):
            raise ValueError(f"--config {path}: {name!r} is not an option of this program (see --help)")
        if action in options:
            raise ValueError(f"--config {path}: {name!r} sets {action.option_strings[0]} a second time: keep one")
        if value is None:
            raise ValueError(f"--config {path}: {name} is null: leave it out to keep its default")
        items = value if isinstance(value, list) else [value]
        if any(isinstance(item, (list, Mapping)) or item is None for item in items):
            raise ValueError(
                f"--config {path}: {name} must be a value or a list of values, not nested lists, mappings or nulls"
            )
        options[action] = [str(item).lower() if isinstance(item, bool) else str(item) for item in items]
    return options


def read_config_file(path: Path) -> Any:
    """The parsed JSON (`.json`) or YAML (any other suffix) document, refusing repeated keys."""
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"--config {path}: {size} bytes, more than a config file's {MAX_CONFIG_BYTES}")
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"--config {path}: cannot read it ({error.strerror})") from error
    except UnicodeDecodeError as error:
        raise ValueError(f"--config {path}: not UTF-8 text ({error.reason} at byte {error.start})") from error
    try:
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=_unique_json_keys)
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RepeatedKeyError as error:
        # The JSON decoder's hook sees no positions: the key's second spelling in the text gives the line.
        found = [match.start() for match in re.finditer(rf"{re.escape(json.dumps(error.key))}\s*:", text)]
        line = text.count("\n", 0, found[1]) + 1 if len(found) > 1 else None
        where = f"line {line}: " if line else ""
        raise ValueError(f"--config {path}: {where}{error}") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"--config {path}: line {error.lineno}: {error.msg}") from error
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise ValueError(f"--config {path}: {where}{error.problem or error.context}") from error
    except yaml.YAMLError as error:
        raise ValueError(f"--config {path}: not valid YAML ({error})") from error


class RepeatedKeyError(ValueError):
    """A key given twice in one mapping of a config file (JSON and YAML parsers silently keep the last)."""

    def __init__(self, key: Any):
        super().__init__(f"key {key!r} appears more than once: keep one")
        self.key = key


def _unique_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key in values:
            raise RepeatedKeyError(key)
        values[key] = value
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain data, no tags that run code) refusing a key given twice in one mapping. Merge
    keys (`<<: *defaults`) keep their meaning: keys written out override merged ones."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, str(RepeatedKeyError(key)), key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def apply_config_value(
    parser: argparse.ArgumentParser, action: argparse.Action, items: list[str], namespace: argparse.Namespace
) -> None:
    """Converts and checks `items` with the action's own type and choices (argparse's errors, as on the command
    line) and stores them as the action does, without ever reading an item as an option."""
    single = action.nargs in (None, "?")
    fixed = isinstance(action.nargs, int) and action.nargs > 0
    if single and len(items) != 1:
        raise argparse.ArgumentError(action, f"expected one value, got a list of {len(items)}")
    if not (single or fixed or action.nargs in ("*", "+")):
        raise argparse.ArgumentError(action, "cannot be set from a config file: give it on the command line")
    if (action.nargs == "+" and not items) or (fixed and len(items) != action.nargs):
        raise argparse.ArgumentError(action, f"expected {action.nargs} values, got {len(items)}")
    values = [parser._get_value(action, item) for item in items]
    for value in values:
        parser._check_value(action, value)
    action(parser, namespace, values[0] if single else values, action.option_strings[0])


def settings_record(*settings: Any) -> dict[str, Any]:
    """Every option of a run, by name: what the trackers and the exported model cards record."""
    record: dict[str, Any] = {}
    for item in settings:
        record.update(dataclasses.asdict(item))
    return record
