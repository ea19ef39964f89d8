"""The training programs' settings: typed dataclasses parsed from the command line and a `--config` file (JSON or
YAML), with one flag style (underscores; HfArgumentParser also takes the dashed spelling)."""

import json
import runpy
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
