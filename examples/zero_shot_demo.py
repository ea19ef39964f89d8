"""Zero-shot classification of a labelled test split with `pipeline("zero-shot-audio-classification")`.

    python examples/zero_shot_demo.py examples/demo_model examples/data            # the 51 bundled test clips
    python examples/zero_shot_demo.py examples/demo_model ../shared/data/real_sounds --split test    # all 60

DATA is a folder with a metadata.csv (audiofolder layout: file_name relative to the folder, a label column, an
optional split column). Every clip is classified among all labels of the folder's metadata (underscores read as
spaces, the default prompt "{} can be heard"); the script prints each clip's prediction and the top-1 accuracy
against chance. This is `make demo`'s main job on the shipped demo model.
"""

import argparse
import csv
from pathlib import Path

import soundfile as sf
from transformers import pipeline

import m2d2_hf  # registers the M2D2 classes with the Auto classes that pipeline() uses


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an M2D2 CLAP folder (e.g. examples/demo_model)")
    parser.add_argument("data", type=Path, help="folder with metadata.csv and the audio it lists")
    parser.add_argument("--split", default=None, help="keep the rows whose split column equals this")
    args = parser.parse_args(argv)

    with open(args.data / "metadata.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = sorted({row["label"] for row in rows})
    if args.split:
        rows = [row for row in rows if row["split"] == args.split]
    if not rows:
        raise SystemExit(
            f"no clips in {args.data / 'metadata.csv'}" + (f" with split {args.split!r}" if args.split else "")
        )
    spoken = {label.replace("_", " "): label for label in labels}

    classifier = pipeline("zero-shot-audio-classification", model=args.model)
    print(f"m2d2_hf {m2d2_hf.__version__}: {args.model} on {len(rows)} clips of {args.data}")
    correct = 0
    print(f"{'clip':<58} {'label':<20} {'prediction':<20} score")
    for row in rows:
        # Decoded here (soundfile) rather than by the pipeline (ffmpeg): the clips are already 16 kHz mono.
        audio, rate = sf.read(args.data / row["file_name"], dtype="float32")
        if rate != classifier.feature_extractor.sampling_rate:
            raise SystemExit(f"{row['file_name']} is {rate} Hz; this demo expects the model's rate")
        best = classifier(audio, candidate_labels=list(spoken), hypothesis_template="{} can be heard")[0]
        predicted = spoken[best["label"]]
        correct += predicted == row["label"]
        mark = "" if predicted == row["label"] else "  x"
        print(f"{row['file_name'][-58:]:<58} {row['label']:<20} {predicted:<20} {best['score']:.3f}{mark}")
    accuracy = correct / len(rows)
    chance = 1 / len(labels)
    print(
        f"\nzero-shot top-1 accuracy: {accuracy:.3f} ({correct}/{len(rows)} clips, {len(labels)} labels); "
        f"chance {chance:.3f}; {accuracy / chance:.1f}x chance"
    )
    return accuracy


if __name__ == "__main__":
    main()
