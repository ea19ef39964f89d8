"""Model cards: the `README.md` with Hub metadata that every folder the package writes carries.

A card says what the folder holds (read from its config), how it was made, under which licence its weights are,
how to load it, the figures measured on it where known, and how to cite the method. Converted weights stay under
NTT's licence whatever a later stage did with them, so a card derived from a converted folder keeps that licence.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData


CARD_NAME = "README.md"

NTT_LICENCE = "ntt-m2d-license"
NTT_LICENCE_LINK = "https://github.com/nttcslab/m2d"  # the original release, with its licence file
NTT_LICENCE_TEXT = (
    "The weights were converted from NTT's original release and remain under NTT's licence (evaluation use; "
    f"read the licence file of {NTT_LICENCE_LINK} before any other use). The conversion gives no further rights."
)
OWN_WEIGHTS_TEXT = (
    "The weights were trained from scratch by the m2d2_hf training programs; their licence is whatever the owner of "
    "the training data and of this run chooses (the card's `license: other` until they say)."
)

CITATION = """\
@article{niizumi2025m2d2,
  title   = {{M2D2}: Exploring General-purpose Audio-Language Representations Beyond {CLAP}},
  author  = {Niizumi, Daisuke and others},
  journal = {arXiv preprint arXiv:2503.22104},
  note    = {v1; v2 renames the method M2D-CLAP (2025)},
  year    = {2025}
}
@article{niizumi2025m2dclap,
  title   = {{M2D-CLAP} (2025), published version of arXiv:2503.22104},
  author  = {Niizumi, Daisuke and others},
  journal = {IEEE Access},
  doi     = {10.1109/ACCESS.2025.3611348},
  year    = {2025}
}"""

_PIPELINE_TAGS = {
    "M2D2ClapModel": "zero-shot-audio-classification",
    "M2D2ForAudioClassification": "audio-classification",
}

_WHAT_IT_IS = {
    "M2D2ClapModel": "an M2D2 audio-language (CLAP) model: the audio encoder, its projector and a text tower",
    "M2D2AudioModel": "an M2D2 audio encoder (frame and clip features, no text tower)",
    "M2D2ForAudioClassification": "an M2D2 audio encoder with a multi-label classification head",
    "M2D2ForPreTraining": "an M2D2 pre-training state: online and EMA target encoders, predictor and CLAP head",
}

_USAGE = {
    "zero-shot-audio-classification": """\
```python
import m2d2_hf  # registers the M2D2 classes with the Auto classes
from transformers import pipeline

classifier = pipeline("zero-shot-audio-classification", model="{path}")
classifier("clip.flac", candidate_labels=["a dog barks", "a piano plays"], hypothesis_template="{{}} can be heard")
```""",
    "audio-classification": """\
```python
import m2d2_hf
from transformers import pipeline

classifier = pipeline("audio-classification", model="{path}")
classifier("clip.flac", top_k=5)
```""",
    None: """\
```python
import m2d2_hf
from transformers import AutoFeatureExtractor, AutoModel

model = AutoModel.from_pretrained("{path}").eval()
features = AutoFeatureExtractor.from_pretrained("{path}")(wave, sampling_rate=16000, return_tensors="pt")
clip_embedding = model(**features).pooler_output
```""",
}


@dataclass
class ModelCardInfo:
    """What a writer of a folder knows about it beyond its config.

    `made_by` is one or more sentences on how the folder was produced (the command, the source checkpoint, the
    training data and steps); `converted_from_ntt` marks weights that are, or derive from, NTT's release;
    `figures` are measured results, name → value as printed.
    """

    made_by: str
    converted_from_ntt: bool
    figures: Mapping[str, str] = field(default_factory=dict)
    intended_use: str = (
        "Research and evaluation of general-purpose audio and audio-language representations: zero-shot "
        "classification, retrieval, linear probing, fine-tuning. Not evaluated for decisions about people."
    )


def weights_derive_from_ntt(folder: str | os.PathLike) -> bool:
    """Whether the folder's own card says its weights are NTT's (so anything trained from them stays so)."""
    card = Path(folder) / CARD_NAME
    if not card.is_file():
        return False
    return ModelCard.load(card).data.to_dict().get("license_name") == NTT_LICENCE


def architecture_of(folder: str | os.PathLike) -> str:
    """The model class a saved folder holds (the first of its config's `architectures`)."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    return config["architectures"][0]


def conversion_card_info(checkpoint: str | os.PathLike, options: Mapping[str, Any]) -> ModelCardInfo:
    """The card of a folder converted from NTT's original `checkpoint` with the converter's non-default `options`
    (`convert_checkpoint`'s keyword arguments): the weights are NTT's, whatever the options."""
    checkpoint = Path(checkpoint)
    flags = " ".join(_flag(name, value) for name, value in options.items() if value not in (None, False))
    command = f"m2d2-hf convert {checkpoint.parent.name}/{checkpoint.name} OUT_DIR {flags}".rstrip()
    return ModelCardInfo(
        made_by=f"Converted from NTT's original checkpoint `{checkpoint.parent.name}/{checkpoint.name}` by the "
        f"`m2d2_hf` converter (`m2d2_hf.conversion.convert_checkpoint`), as the command\n\n```\n{command}\n```\n\n"
        "The architecture (input size, patch size, sampling rate, text encoder) comes from the original folder name "
        "unless an option above overrides it; every tensor of the checkpoint is mapped or knowingly dropped (the "
        "package's parity tests compare the converted model's outputs with the original implementation's).",
        converted_from_ntt=True,
    )


def training_card_info(
    program: str, settings: Mapping[str, Any], sources: Sequence[str | os.PathLike | None], steps: int
) -> ModelCardInfo:
    """The card of a folder exported by a training `program` (e.g. `examples/pretrain_stage1.py`) after `steps`
    optimiser steps, run with `settings` (every option of the run); `sources` are the model folders it started from
    (None where it started from new weights). Weights trained from NTT's stay under NTT's licence."""
    started = [str(source) for source in sources if source]
    origin = f"started from {', '.join(f'`{source}`' for source in started)}" if started else "new weights"
    total = settings.get("max_train_steps")
    data = settings.get("train_data")
    split = f" (split `{settings['split']}`)" if settings.get("split") else ""
    text = json.dumps(dict(settings), indent=2, sort_keys=True, default=str)
    return ModelCardInfo(
        made_by=f"Exported by `{program}` after {steps} of {total} optimiser steps on `{data}`{split}, {origin}. "
        f"The run's settings (its command-line options):\n\n```json\n{text}\n```",
        converted_from_ntt=any(weights_derive_from_ntt(source) for source in started),
    )


def _flag(name: str, value: Any) -> str:
    flag = "--" + name.replace("_", "-")
    if value is True:
        return flag
    if isinstance(value, (tuple, list)):  # input_size / patch_size, written as the CLI reads them: 80x1001
        value = "x".join(map(str, value))
    return f"{flag} {value}"


def render_model_card(architecture: str, info: ModelCardInfo, path_hint: str = "path/to/this/folder") -> ModelCard:
    """The card of a folder holding `architecture` (a class name of this package)."""
    pipeline_tag = _PIPELINE_TAGS.get(architecture)
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["audio", "m2d2", "m2d-clap", "m2d2_hf"],
        license="other",
        license_name=NTT_LICENCE if info.converted_from_ntt else "trained-with-m2d2-hf",
        license_link=NTT_LICENCE_LINK if info.converted_from_ntt else None,
    )
    what = _WHAT_IT_IS.get(architecture, f"an M2D2 model ({architecture})")
    figures = "\n".join(f"| {name} | {value} |" for name, value in info.figures.items())
    sections = [
        f"# M2D2 — {architecture}",
        f"This folder holds {what}, in the layout of the `m2d2_hf` package (Hugging Face transformers 5). M2D2 is "
        "NTT's general-purpose audio-language representation: a ViT audio encoder trained by masked modeling duo "
        "(M2D) plus CLAP, then a text tower trained contrastively against the frozen encoder (arXiv 2503.22104).",
        "## How it was made\n\n" + info.made_by,
        "## Licence\n\n" + (NTT_LICENCE_TEXT if info.converted_from_ntt else OWN_WEIGHTS_TEXT),
        "## Intended use\n\n" + info.intended_use,
        "## How to use\n\n" + _USAGE[pipeline_tag].format(path=path_hint),
    ]
    if figures:
        sections.append("## Measured\n\n| measure | value |\n|---|---|\n" + figures)
    sections.append("## Citation\n\n```bibtex\n" + CITATION + "\n```")
    return ModelCard("---\n" + metadata.to_yaml() + "\n---\n\n" + "\n\n".join(sections) + "\n")


def write_model_card(folder: str | os.PathLike, architecture: str, info: ModelCardInfo) -> Path:
    """Writes `README.md` into `folder` (a folder being saved) and returns its path."""
    path = Path(folder) / CARD_NAME
    render_model_card(architecture, info, path_hint=Path(folder).name).save(path)
    return path
