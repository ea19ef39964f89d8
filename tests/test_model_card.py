"""Model cards: Hub metadata that parses, the licence that follows the weights, the demo folder's card."""

import json
from pathlib import Path

from huggingface_hub import ModelCard

from m2d2_hf.model_card import (
    NTT_LICENCE,
    ModelCardInfo,
    render_model_card,
    weights_derive_from_ntt,
    write_model_card,
)

DEMO_MODEL = Path(__file__).resolve().parents[1] / "examples" / "demo_model"


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
