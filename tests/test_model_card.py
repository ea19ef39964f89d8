"""Model cards: Hub metadata that parses, the licence that follows the weights, the demo folder's card."""

import json
from pathlib import Path

from huggingface_hub import ModelCard

from m2d2_hf.model_card import (
    NTT_LICENCE,
    ModelCardInfo,
    conversion_card_info,
    render_model_card,
    training_card_info,
    weights_derive_from_ntt,
    write_model_card,
)


DEMO_MODEL = Path(__file__).resolve().parents[1] / "examples" / "demo_model"


def assert_model_card(folder: Path, architecture: str, pipeline_tag: str | None, ntt: bool) -> ModelCard:
    """The card a writer of the package put into `folder`: Hub metadata, the licence of the weights, how to load."""
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "no Hub metadata header"
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.license == "other"
    assert card.data.pipeline_tag == pipeline_tag
    assert (card.data.to_dict()["license_name"] == NTT_LICENCE) is ntt
    assert f"# M2D2 — {architecture}" in card.text and "## How it was made" in card.text
    assert "from_pretrained" in card.text or "pipeline(" in card.text
    assert weights_derive_from_ntt(folder) is ntt
    return card


def test_converted_weights_keep_ntt_licence_and_card_parses(tmp_path):
    path = write_model_card(
        tmp_path, "M2D2ClapModel", ModelCardInfo(made_by="Converted from x.pth.", converted_from_ntt=True)
    )
    card = ModelCard.load(path)
    assert card.data.license == "other" and card.data.to_dict()["license_name"] == NTT_LICENCE
    assert card.data.pipeline_tag == "zero-shot-audio-classification" and card.data.library_name == "transformers"
    assert "Converted from x.pth." in card.text and "NTT's licence" in card.text
    assert "arXiv:2503.22104" in card.text and "10.1109/ACCESS.2025.3611348" in card.text
    assert weights_derive_from_ntt(tmp_path)


def test_own_weights_are_not_marked_as_ntt_and_figures_are_listed(tmp_path):
    info = ModelCardInfo(made_by="Trained.", converted_from_ntt=False, figures={"top-1": "0.5"})
    write_model_card(tmp_path, "M2D2ForAudioClassification", info)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag == "audio-classification"
    assert not weights_derive_from_ntt(tmp_path) and not weights_derive_from_ntt(tmp_path / "missing")
    assert "| top-1 | 0.5 |" in card.text
    encoder = render_model_card("M2D2AudioModel", info)
    assert encoder.data.pipeline_tag is None and "AutoModel.from_pretrained" in encoder.text


def test_demo_folder_card_reports_its_measured_figures():
    card = ModelCard.load(DEMO_MODEL / "README.md")
    report = json.loads((DEMO_MODEL / "demo_report.json").read_text())
    assert card.data.pipeline_tag == "zero-shot-audio-classification"
    assert card.data.to_dict()["license_name"] != NTT_LICENCE  # trained here, not converted
    assert f"{report['top1_accuracy']:.3f} (chance {report['chance_accuracy']:.3f})" in card.text


def test_conversion_card_names_the_checkpoint_and_the_command():
    checkpoint = Path("m2d_vit_base-80x208p16x16-240101/checkpoint-300.pth")
    info = conversion_card_info(checkpoint, {"encoder_only": True, "input_size": [80, 208], "tokenizer": None})
    assert info.converted_from_ntt
    command = f"m2d2-hf convert {checkpoint} OUT_DIR --encoder-only --input-size 80x208\n"
    assert command in info.made_by


def test_training_card_keeps_ntt_licence_of_its_source(tmp_path):
    converted, trained = tmp_path / "converted", tmp_path / "trained"
    write_model_card(converted, "M2D2AudioModel", ModelCardInfo(made_by="Converted.", converted_from_ntt=True))
    write_model_card(trained, "M2D2AudioModel", ModelCardInfo(made_by="Trained.", converted_from_ntt=False))
    settings = {"train_data": "data/clips", "split": "train", "max_train_steps": 30, "output_dir": tmp_path}
    info = training_card_info("examples/finetune_audio_classification.py", settings, [converted], 20)
    assert info.converted_from_ntt
    assert "after 20 of 30 optimiser steps on `data/clips` (split `train`)" in info.made_by
    assert f'"output_dir": "{tmp_path}"' in info.made_by  # every setting, paths as text
    assert not training_card_info("p.py", settings, [trained, None], 30).converted_from_ntt
    assert "new weights" in training_card_info("p.py", settings, [None], 30).made_by
