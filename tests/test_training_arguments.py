"""The training programs' settings: typed dataclasses parsed from the command line and a `--config` file (JSON or
YAML), with one flag style (underscores; HfArgumentParser also takes the dashed spelling)."""

import json
import runpy
import time
from pathlib import Path

import pytest

from m2d2_hf.training.arguments import TrainingSettings, parse_settings, settings_record
from m2d2_hf.training.finetune import EvaluationSettings, FinetuneSettings, FinetuneTrainingSettings
from m2d2_hf.training.stage1 import Stage1Settings
from m2d2_hf.training.stage2 import Stage2Settings, Stage2TrainingSettings


REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["--train_data", "data", "--output_dir", "out", "--max_train_steps", "5"]


def test_each_program_has_its_own_defaults_for_the_shared_options():
    stage1, _ = parse_settings((TrainingSettings, Stage1Settings), REQUIRED)
    stage2, _ = parse_settings((Stage2TrainingSettings, Stage2Settings), REQUIRED)
    finetune, settings, _ = parse_settings(
        (FinetuneTrainingSettings, FinetuneSettings, EvaluationSettings), REQUIRED + ["--model_name_or_path", "m"]
    )
    assert (stage1.seed, stage1.warmup_ratio, stage1.max_grad_norm) == (7, 20 / 300, 3.0)
    assert (stage2.seed, stage2.warmup_ratio) == (777, 5 / 30)
    assert (finetune.global_batch_size, finetune.weight_decay, finetune.max_grad_norm) == (64, None, 0.0)
    assert finetune.warmup_steps == round(15 / 70 * 5) and settings.optimizer == "sgd"


def test_filters_repeat_and_dashed_flags_are_the_same_options():
    training, stage = parse_settings(
        (TrainingSettings, Stage1Settings),
        REQUIRED + ["--filter", "split=train", "--filter", "fold=1", "--per-device-train-batch-size", "8"]
        + ["--norm_stats", "-4.5", "4.0", "--allow_uncaptioned"],
    )  # fmt: skip
    assert training.filter == ["split=train", "fold=1"] and training.per_device_train_batch_size == 8
    assert stage.norm_stats == [-4.5, 4.0] and stage.allow_uncaptioned is True
    with pytest.raises(ValueError, match="--norm_stats takes two values"):
        parse_settings((TrainingSettings, Stage1Settings), REQUIRED + ["--norm_stats", "1"])


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_a_config_file_gives_options_that_the_command_line_overrides(tmp_path, suffix):
    values = {"train_data": "data", "output_dir": "out", "max_train_steps": 10, "filter": ["split=train"],
              "mask_padding": True, "mask_type": "unstructured", "seed": 3}  # fmt: skip
    config = tmp_path / f"run{suffix}"
    config.write_text(json.dumps(values))  # JSON is YAML too
    training, stage = parse_settings(
        (Stage2TrainingSettings, Stage2Settings), ["--config", str(config), "--seed", "4", "--filter", "fold=2"]
    )
    assert (training.train_data, training.max_train_steps, training.seed) == ("data", 10, 4)
    assert training.filter == ["split=train", "fold=2"]
    assert stage.mask_padding is True and stage.mask_type == "unstructured"
    record = settings_record(training, stage)
    assert record["seed"] == 4 and record["mask_type"] == "unstructured"


def test_a_config_file_with_a_bad_option_names_it(tmp_path):
    types = (TrainingSettings, Stage1Settings)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train_data: data\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="'learning_rat' is not an option of this program"):
        parse_settings(types, ["--config", str(unknown)])
    null = tmp_path / "null.json"
    null.write_text('{"id_column": null}')
    with pytest.raises(ValueError, match="id_column is null: leave it out"):
        parse_settings(types, ["--config", str(null)])
    listed = tmp_path / "list.yaml"
    listed.write_text("- train_data\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        parse_settings(types, ["--config", str(listed)])
    with pytest.raises(ValueError, match="cannot read it"):
        parse_settings(types, ["--config", str(tmp_path / "missing.json")])


def test_a_wrong_value_in_a_config_file_is_refused_as_on_the_command_line(tmp_path, capsys):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"train_data": "d", "output_dir": "o", "max_train_steps": "many"}))
    with pytest.raises(SystemExit):
        parse_settings((TrainingSettings, Stage1Settings), ["--config", str(config)])
    assert "--max_train_steps/--max-train-steps: invalid int value: 'many'" in capsys.readouterr().err


@pytest.mark.parametrize("program", ["pretrain_stage1", "pretrain_stage2", "finetune_audio_classification"])
def test_every_program_takes_a_config_file(program, capsys):
    main = runpy.run_path(str(REPO_ROOT / "examples" / f"{program}.py"))["main"]
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert "--config CONFIG" in shown and "--train_data" in shown


def test_the_cli_takes_the_programs_flag_style_and_keeps_the_dashed_one():
    from m2d2_hf.cli import build_parser
    from m2d2_hf.evaluation.cli import add_label_arguments, evaluation_parser

    parser = build_parser()
    for spelling in ("--label_column", "--label-column"):
        args = parser.parse_args(["zero-shot", "model", "clip.wav", "--labels", "a,b", spelling, "tag"])
        assert args.label_column == "tag"
    args = parser.parse_args(["convert", "c.pth", "out", "--text_model", "t", "--text_pooling", "mean"])
    assert (args.text_model, args.text_pooling) == ("t", "mean")
    args = parser.parse_args(["index", "model", "data", "--output", "out", "--audio_column", "wave"])
    assert args.audio_column == "wave"
    evaluation = evaluation_parser("test")
    add_label_arguments(evaluation)
    args = evaluation.parse_args(["m", "d", "--audio_column", "a", "--multi_label", "--label_separator", ";"])
    assert (args.audio_column, args.multi_label, args.label_separator) == ("a", True, ";")
    assert evaluation.parse_args(["m", "d", "--multi-label", "--label-column", "c"]).label_column == "c"


def test_config_values_are_never_read_as_options(tmp_path):
    """A list item or a value that starts with `--` is a value: it cannot move another option."""
    config = tmp_path / "run.yaml"
    config.write_text("train_data: data\noutput_dir: out\nmax_train_steps: 5\nfilter: [a=b, --output_dir, X]\n")
    training, _ = parse_settings((TrainingSettings, Stage1Settings), ["--config", str(config)])
    assert training.output_dir == "out" and training.filter == ["a=b", "--output_dir", "X"]
    config.write_text('{"train_data": "--output_dir", "output_dir": "out", "max_train_steps": 5, "filter": ["--"]}')
    config = config.rename(tmp_path / "run.json")
    training, _ = parse_settings((TrainingSettings, Stage1Settings), ["--config", str(config)])
    assert (training.train_data, training.output_dir, training.filter) == ("--output_dir", "out", ["--"])
    config.write_text('{"train_data": "d", "output_dir": "o", "max_train_steps": 5, "norm_stats": ["--seed", "9"]}')
    with pytest.raises(SystemExit):
        parse_settings((TrainingSettings, Stage1Settings), ["--config", str(config)])


def test_config_keys_take_both_spellings_once(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("train-data: data\noutput_dir: out\nmax-train-steps: 5\nper-device-train-batch-size: 8\n")
    training, _ = parse_settings((TrainingSettings, Stage1Settings), ["--config", str(config)])
    assert (training.train_data, training.max_train_steps, training.per_device_train_batch_size) == ("data", 5, 8)
    config.write_text("train_data: data\ntrain-data: other\n")
    with pytest.raises(ValueError, match="'train-data' sets --train_data a second time"):
        parse_settings((TrainingSettings, Stage1Settings), ["--config", str(config)])


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("repeat.yaml", "train_data: a\noutput_dir: o\ntrain_data: b\n", r"line 3: key 'train_data' appears more"),
        ("repeat.json", '{"seed": 1,\n "train_data": "a",\n "seed": 2}', r"line 3: key 'seed' appears more than once"),
        ("broken.yaml", "train_data: a\nfilter: [a=b\nseed: 3\n", r"line \d+: "),
        ("broken.json", '{"train_data": "a",\n "seed": }', r"line 2: Expecting value"),
        ("nested.yaml", "filter: [[a=b]]\n", r"filter must be a value or a list of values"),
        ("mapping.yaml", "filter: {a: b}\n", r"filter must be a value or a list of values"),
        ("binary.yaml", b"\xff\xfe\x00", r"not UTF-8 text"),
    ],
)
def test_malformed_config_files_name_the_file_and_the_line(tmp_path, name, text, message):
    config = tmp_path / name
    config.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=rf"--config {config}: {message}"):
        parse_settings((TrainingSettings, Stage1Settings), ["--config", str(config)])


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine levels of nested aliases under `filter`: under a kilobyte that expands to 10^9 strings if followed."""
    levels = ["  - &a0 [" + ", ".join(["x"] * 10) + "]"]
    levels += [f"  - &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]" for level in range(1, 9)]
    config = tmp_path / "bomb.yaml"
    config.write_text("train_data: d\nfilter:\n" + "\n".join(levels) + "\n")
    assert config.stat().st_size < 1000
    started = time.perf_counter()
    with pytest.raises(ValueError, match="filter must be a value or a list of values"):
        parse_settings((TrainingSettings, Stage1Settings), ["--config", str(config)])
    assert time.perf_counter() - started < 5


def test_an_oversized_config_file_is_refused(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("train_data: d\nfilter: [" + "x, " * 400_000 + "x]\n")
    with pytest.raises(ValueError, match="more than a config file's"):
        parse_settings((TrainingSettings, Stage1Settings), ["--config", str(config)])
