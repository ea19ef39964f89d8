"""Text-queried sound-event timeline over a concatenation of clips, one query per clip.

    python examples/timeline_demo.py examples/demo_model out/timeline \
        examples/data/audio/cattle/tux_animals_mammals_bovines_cow.flac:"cattle can be heard" ...

Each CLIP:QUERY pair adds the clip (followed by 0.5 s of silence) to one recording, written as
`OUT_DIR/timeline_demo.flac`; the timeline of all queries over it goes to `OUT_DIR/timeline_demo.png` (+ .csv,
.json). The script prints, per query, where its similarity peaks and whether that is inside its own clip — the same
as `m2d2-hf timeline MODEL OUT_DIR/timeline_demo.flac --queries ...` on the written file.
"""

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf
from transformers import AutoProcessor

from m2d2_hf import M2D2ClapModel
from m2d2_hf.timeline import plot_timeline, sound_event_timeline


GAP_SECONDS = 0.5


def concatenate(clips: list[Path], sampling_rate: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """The clips one after another, each followed by silence; returns the audio and each clip's (start, end) s."""
    pieces, segments, position = [], [], 0
    gap = np.zeros(int(GAP_SECONDS * sampling_rate), dtype=np.float32)
    for clip in clips:
        audio, rate = sf.read(clip, dtype="float32")
        if rate != sampling_rate or audio.ndim != 1:
            raise SystemExit(f"{clip}: expected mono audio at {sampling_rate} Hz, got {rate} Hz, shape {audio.shape}")
        segments.append((position / sampling_rate, (position + len(audio)) / sampling_rate))
        pieces += [audio, gap]
        position += len(audio) + len(gap)
    return np.concatenate(pieces), segments


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an M2D2 CLAP folder")
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("pairs", nargs="+", metavar="CLIP:QUERY", help="an audio file and the text that describes it")
    parser.add_argument("--window", type=float, default=1.0, help="window length in seconds (default: 1.0)")
    parser.add_argument("--hop", type=float, default=0.25, help="hop between windows in seconds (default: 0.25)")
    args = parser.parse_args(argv)
    clips, queries = zip(*(pair.split(":", 1) for pair in args.pairs))

    model = M2D2ClapModel.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    rate = processor.feature_extractor.sampling_rate
    audio, segments = concatenate([Path(clip) for clip in clips], rate)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    sf.write(args.output_dir / "timeline_demo.flac", audio, rate)

    timeline = sound_event_timeline(model, processor, audio, list(queries), args.window, args.hop)
    png = plot_timeline(timeline, audio, rate, args.output_dir / "timeline_demo.png", title="demo model timeline")
    timeline.save(args.output_dir / "timeline_demo")
    all_inside = True
    for query, row, (start, end) in zip(queries, timeline.similarities, segments):
        peak = float(timeline.times[int(np.argmax(row))])
        inside = start <= peak <= end
        all_inside &= inside
        print(
            f"{query!r}: peak at {peak:.2f} s; its clip spans {start:.2f}-{end:.2f} s -> "
            f"{'inside' if inside else 'OUTSIDE'}"
        )
    print(f"wrote {png}")
    return all_inside


if __name__ == "__main__":
    main()
