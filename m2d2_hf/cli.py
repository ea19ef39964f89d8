"""The `m2d2-hf` command line: convert original checkpoints, embed audio files, classify them zero-shot.

    m2d2-hf convert CHECKPOINT OUT_DIR [--tokenizer ...] [--text-model ...] [--encoder-only] [--pretraining] ...
    m2d2-hf embed MODEL_DIR AUDIO... --output OUT [--format npy|safetensors] [--level clip|frame|clap|all]
    m2d2-hf zero-shot MODEL_DIR AUDIO... --labels a,b,c [--template "{} can be heard"] [--top-k 5] [--json]
    m2d2-hf zero-shot MODEL_DIR --metadata DATA/metadata.csv [--split test] [--labels ...]   (prints the accuracy)
    m2d2-hf index MODEL_DIR SOURCE --output INDEX_DIR [--window 2 --hop 1] [--index-type flat|ivf|hnsw]
    m2d2-hf search INDEX_DIR "a dog barks" [--audio example.wav] [--top-k 10] [--json]
    m2d2-hf serve INDEX_DIR [--port 7860]
    m2d2-hf export MODEL_DIR OUT_DIR --format onnx [--quantize int8] [--overwrite]   (ONNX Runtime graphs)

Every command is a thin layer over the package (`convert_checkpoint`, the Auto classes, the
zero-shot-audio-classification pipeline's computation, batched). User errors (missing or unreadable files, a folder
that is not an M2D2 model, no labels, ...) end with one line on stderr and exit code 2, never a traceback: the
library raises its own error types and only this module turns them into messages.
"""

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoProcessor
from transformers.utils import logging as transformers_logging

from .argument_types import positive_int, positive_seconds
from .configuration_m2d2 import M2D2Config
from .conversion import convert_checkpoint
from .cpu_inference import cpu_has_native_bf16, optimize_for_cpu_inference
from .data.audio import AudioDecodeError, AudioFile, inspect_audio_files, mono_at, read_audio
from .data.labels import class_names, parse_label_list
from .data.sources import metadata_rows
from .feature_extraction_m2d2 import M2D2FeatureExtractor
from .loading import ModelLoadError, load_feature_extractor, load_m2d2_config, load_pretrained, pick_device
from .modeling_m2d2 import M2D2ClapModel, frame_timestamps, masked_mean
from .prompts import DEFAULT_TEMPLATE, PromptError, label_prompts


LEVELS = ("clip", "frame", "clap", "all")


class CLIError(Exception):
    """A user error: `run` prints it as one line on stderr and exits with code 2."""


# The library's errors for user input (a bad file, folder, device or prompt): `run` prints them as one line too.
USER_ERRORS = (CLIError, AudioDecodeError, ModelLoadError, PromptError)


class IntermixedParser(argparse.ArgumentParser):
    """A sub-command parser that takes options before, between and after the positionals
    (`zero-shot MODEL --labels a,b FILE...`): `nargs="*"` positionals stop at the first option otherwise."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


# ---------------------------------------------------------------------------------------------------------------------
# Argument definitions (shared with conversion/convert_original_m2d2.py)
# ---------------------------------------------------------------------------------------------------------------------


def _size_pair(text: str) -> tuple[int, int]:
    """Parses `80x1001` into (80, 1001)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise argparse.ArgumentTypeError(f"expected two positive integers like 80x1001, got {text!r}")
    return int(parts[0]), int(parts[1])


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of `convert` to `parser` and makes it run the conversion."""
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        type=Path,
        help="original .pth file (the name of its folder gives the architecture)",
    )
    parser.add_argument("output_dir", metavar="OUT_DIR", type=Path, help="folder to write the transformers model to")
    parser.add_argument(
        "--tokenizer",
        metavar="DIR_OR_ID",
        help="tokenizer of a CLAP model (default: the text model, else bert-base-uncased from the hub); offline, any "
        "folder with bert-base-uncased's vocab.txt",
    )
    parser.add_argument(
        "--text_model",
        "--text-model",
        metavar="DIR_OR_ID",
        help="text tower for checkpoints that do not contain it (the 2024 model: thenlper/gte-base)",
    )
    parser.add_argument(
        "--text_pooling",
        "--text-pooling",
        choices=("cls", "mean"),
        help="text pooling (default: from the folder name's letter)",
    )
    parser.add_argument("--input-size", type=_size_pair, metavar="FxT", help="mel bins x frames, e.g. 80x1001")
    parser.add_argument("--patch-size", type=_size_pair, metavar="FxT", help="patch height x width, e.g. 16x16")
    parser.add_argument("--sampling-rate", type=positive_int, metavar="HZ", help="e.g. 16000")
    parser.add_argument(
        "--encoder-only",
        action="store_true",
        help="write only the audio encoder (M2D2AudioModel) of a CLAP checkpoint",
    )
    parser.add_argument(
        "--pretraining",
        action="store_true",
        help="write an M2D2ForPreTraining folder (online + EMA target encoders, predictor, stage-1 CLAP head) from an "
        "original pre-training checkpoint, to continue pre-training with examples/pretrain_stage1.py",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR whole when it already holds files (refused otherwise)",
    )
    parser.set_defaults(handler=run_convert)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of `export` to `parser` and makes it run the export."""
    parser.add_argument("model", metavar="MODEL_DIR", type=Path, help="M2D2 CLAP or audio encoder folder")
    parser.add_argument("output_dir", metavar="OUT_DIR", type=Path, help="folder to write the ONNX export to")
    parser.add_argument("--format", required=True, choices=("onnx",), help="export format")
    parser.add_argument("--quantize", choices=("int8",), help="also write audio.int8.onnx (dynamic int8)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUT_DIR whole when it already holds files (refused otherwise)",
    )
    parser.set_defaults(handler=run_export)


def add_bf16_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="run the model in bfloat16, on the CPU tuned by optimize_for_cpu_inference (about 2x faster than float32 "
        "on CPUs with native bf16: AVX512-BF16 or AMX; embeddings within cosine 0.999 of float32); CPUs without it "
        "(e.g. AVX2 only) keep float32, with a warning",
    )


def prepare_model(model: torch.nn.Module, device: torch.device, bf16: bool) -> torch.nn.Module:
    """Moves `model` to `device` in eval mode; with `bf16`, casts it and, on the CPU, tunes it for inference. On a CPU
    without native bf16 the model stays float32 (emulated bf16 is slower there), with a one-line warning on stderr."""
    model.to(device).eval()
    if bf16 and device.type == "cpu" and not cpu_has_native_bf16():
        print(
            "warning: --bf16 ignored: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 runs emulated and "
            "slower than float32; running in float32",
            file=sys.stderr,
        )
    elif bf16:
        model.to(torch.bfloat16)
        if device.type == "cpu":
            optimize_for_cpu_inference(model)
    return model


def add_embed_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of `embed` to `parser` and makes it run the embedding."""
    parser.add_argument("model", metavar="MODEL_DIR", help="M2D2 model folder (audio encoder or CLAP) or hub id")
    parser.add_argument("audio", metavar="AUDIO", nargs="+", type=Path, help="audio files (any rate, any channels)")
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        type=Path,
        help="a folder of .npy files, or one .safetensors file with keys <stem>/<level>",
    )
    parser.add_argument(
        "--format",
        choices=("npy", "safetensors"),
        help="output format (default: safetensors when OUTPUT ends in .safetensors, else npy)",
    )
    parser.add_argument(
        "--level",
        choices=LEVELS,
        default="clip",
        help="clip: mean of the frame features; frame: frame features and their start times in ms; clap: "
        "L2-normalised CLAP audio embedding (CLAP folders only); all: every level the model has (default: clip)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=8, help="files per forward pass (default: 8)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    add_bf16_argument(parser)
    parser.set_defaults(handler=run_embed)


def add_zero_shot_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of `zero-shot` to `parser` and makes it run the classification."""
    parser.add_argument("model", metavar="MODEL_DIR", help="M2D2 CLAP model folder or hub id")
    parser.add_argument(
        "audio",
        metavar="AUDIO",
        nargs="*",
        type=Path,
        help="audio files (any rate, any channels); default with --metadata: every file it lists",
    )
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="comma-separated class names (underscores read as spaces in the prompt)")
    labels.add_argument("--labels-file", type=Path, help="a text file with one class name per line")
    parser.add_argument(
        "--metadata",
        type=Path,
        help="a labelled set's metadata.csv (audiofolder layout: file_name relative to its folder, a label column): "
        "scores the predictions and prints the top-1 accuracy; the class names default to all its distinct labels",
    )
    parser.add_argument(
        "--label_column", "--label-column", default="label", help="label column of --metadata (default: label)"
    )
    parser.add_argument("--split", help="keep the --metadata rows whose 'split' column has this value (e.g. test)")
    parser.add_argument(
        "--template",
        help=f"prompt with {{}} for the class name (default: the model's zero_shot_template, {DEFAULT_TEMPLATE!r})",
    )
    parser.add_argument("--top-k", type=positive_int, default=5, help="predictions shown per file (default: 5)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="files per forward pass (default: 8)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    add_bf16_argument(parser)
    parser.set_defaults(handler=run_zero_shot)


def add_timeline_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the arguments of `timeline` to `parser` and makes it run the timeline."""
    parser.add_argument("model", metavar="MODEL_DIR", help="M2D2 CLAP model folder or hub id")
    parser.add_argument("audio", metavar="AUDIO", type=Path, help="an audio file (any rate, any channels)")
    parser.add_argument("--queries", required=True, help="comma-separated text queries, e.g. 'a dog barks,speech'")
    parser.add_argument("--window", type=positive_seconds, default=2.0, help="window length in seconds (default: 2.0)")
    parser.add_argument(
        "--hop", type=positive_seconds, default=0.5, help="stride between windows in seconds (default: 0.5)"
    )
    parser.add_argument(
        "--output", type=Path, required=True, help="PNG to write; the numbers go beside it as .csv and .json"
    )
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    add_bf16_argument(parser)
    parser.set_defaults(handler=run_timeline)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="m2d2-hf", description="M2D2 / M2D-CLAP (2025) audio and audio-language models for transformers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=IntermixedParser)
    add_convert_arguments(
        commands.add_parser(
            "convert",
            help="convert an original NTT checkpoint into a transformers folder",
            description="Convert an original M2D / M2D-CLAP / M2D2 .pth checkpoint into a save_pretrained folder.",
        )
    )
    add_embed_arguments(
        commands.add_parser(
            "embed",
            help="write clip, frame or CLAP embeddings of audio files",
            description="Embed audio files with an M2D2 model folder and write one array per file and level.",
        )
    )
    add_zero_shot_arguments(
        commands.add_parser(
            "zero-shot",
            help="classify audio files against free-text labels",
            description="Zero-shot classification with an M2D2 CLAP folder (the zero-shot-audio-classification "
            "pipeline), prompts made from the labels with underscores read as spaces.",
        )
    )
    add_timeline_arguments(
        commands.add_parser(
            "timeline",
            help="plot how well text queries match an audio file over time",
            description="Text-queried sound-event timeline: cosine similarity of each query to sliding windows of "
            "the audio through the CLAP audio path; writes a PNG plot and the numbers as CSV and JSON.",
        )
    )
    add_export_arguments(
        commands.add_parser(
            "export",
            help="export a model folder to ONNX for ONNX Runtime",
            description="Export an M2D2 CLAP or audio encoder folder to ONNX (audio.onnx with dynamic batch and "
            "frames, text.onnx for CLAP folders, optionally audio.int8.onnx), with its feature extractor, tokenizer "
            "and a README giving the parity measured against PyTorch.",
        )
    )
    add_search_commands(commands)
    return parser


def _library_errors(handler):
    """Wraps a handler of the search package, whose errors are exceptions of the library, into CLIError."""

    def run_handler(args: argparse.Namespace) -> None:
        try:
            handler(args)
        except (ImportError, OSError, ValueError) as error:
            raise CLIError(str(error)) from error

    return run_handler


def add_search_commands(commands) -> None:
    """`index`, `search`, `serve` and `index-space` (m2d2_hf.search; FAISS and the web page come with the [search] /
    [app] extras)."""
    from .search import commands as search

    for name, add, handler, help_text in (
        ("index", search.add_index_arguments, search.run_index, "embed a sound collection into a search index"),
        ("search", search.add_search_arguments, search.run_search, "search an index by text or by example"),
        ("serve", search.add_serve_arguments, search.run_serve, "serve an index as a web page on 127.0.0.1"),
        ("index-space", search.add_space_arguments, search.run_space, "list or switch an index's embedding spaces"),
    ):
        parser = commands.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add(parser)
        parser.set_defaults(handler=_library_errors(handler))


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parses `argv` with `parser` and runs the chosen handler; returns the exit code instead of exiting."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, or argparse's own usage errors (code 2)
        code = exit_request.code
        return code if isinstance(code, int) else int(code is not None)
    try:
        args.handler(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).split())  # one line, whatever the wrapped exception printed
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `m2d2-hf` console script."""
    # transformers draws a "Loading weights" bar for every model loaded, finished before anything else is said; a
    # command shows its result and the progress of its own work only.
    transformers_logging.disable_progress_bar()
    return run(build_parser(), argv)


# ---------------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------------


def run_convert(args: argparse.Namespace) -> None:
    try:
        output_dir = convert_checkpoint(
            args.checkpoint,
            args.output_dir,
            tokenizer=args.tokenizer,
            text_model=args.text_model,
            text_pooling=args.text_pooling,
            input_size=args.input_size,
            patch_size=args.patch_size,
            sampling_rate=args.sampling_rate,
            encoder_only=args.encoder_only,
            pretraining=args.pretraining,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:  # the converter's messages say what to change
        raise CLIError(f"cannot convert {args.checkpoint}: {error}") from error
    architecture = AutoConfig.from_pretrained(output_dir).architectures[0]
    print(f"wrote {architecture} to {output_dir}")


def run_export(args: argparse.Namespace) -> None:
    try:
        from .onnx_export import export_onnx

        output_dir = export_onnx(args.model, args.output_dir, quantize=args.quantize, overwrite=args.overwrite)
    except ImportError as error:
        raise CLIError(
            f"ONNX export needs onnx, onnxscript and onnxruntime: pip install 'm2d2_hf[onnx]' ({error})"
        ) from error
    except ModelLoadError:
        raise  # its message names the folder and the problem already
    except (OSError, ValueError) as error:
        raise CLIError(f"cannot export {args.model}: {error}") from error
    print(f"wrote {', '.join(sorted(p.name for p in output_dir.glob('*.onnx')))} to {output_dir}")


# ---------------------------------------------------------------------------------------------------------------------
# Shared by embed and zero-shot
# ---------------------------------------------------------------------------------------------------------------------


def check_long_enough(files: Sequence[AudioFile], feature_extractor: M2D2FeatureExtractor) -> None:
    """Rejects clips shorter than one patch before any compute, naming the file (the extractor only knows indices)."""
    target = feature_extractor.sampling_rate
    for file in files:
        # Length after torchaudio's resampling: ceil(n * target / rate).
        resampled = -(-file.num_samples * target // file.sampling_rate)
        if resampled < feature_extractor.min_samples:
            raise CLIError(
                f"{file.path} is too short ({file.num_samples / file.sampling_rate:.3f} s): the model needs at "
                f"least {feature_extractor.min_samples / target:g} s of audio"
            )


def writable_folder(folder: Path, option: str) -> Path:
    """Creates `folder` if needed and checks that a file can be written there, before any compute."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise CLIError(f"cannot write {option} into {folder}: {error}") from error
    return folder


def progress(total: int, description: str) -> tqdm:
    """A progress bar on stderr; hidden for a single file and when stderr is not a terminal (`disable=None`)."""
    return tqdm(total=total, unit="file", desc=description, file=sys.stderr, disable=True if total < 2 else None)


# ---------------------------------------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------------------------------------


def batches_by_rate(files: Sequence[AudioFile], batch_size: int) -> Iterator[list[AudioFile]]:
    """Batches of files that share a sampling rate: the feature extractor takes one rate per call."""
    by_rate: dict[int, list[AudioFile]] = {}
    for file in files:
        by_rate.setdefault(file.sampling_rate, []).append(file)
    for group in by_rate.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


def unique_stems(files: Sequence[AudioFile]) -> None:
    """Output names come from file stems; two inputs with one stem would overwrite each other."""
    seen: dict[str, Path] = {}
    for file in files:
        stem = file.path.stem
        if stem in seen:
            raise CLIError(f"{seen[stem]} and {file.path} have the same stem {stem!r}: output names would collide")
        seen[stem] = file.path


class NpyWriter:
    """`<stem>.<level>.npy` files in one folder, written as they come (nothing accumulates in memory)."""

    def __init__(self, folder: Path):
        if folder.exists() and not folder.is_dir():
            raise CLIError(f"--output {folder} exists and is not a folder (npy output is a folder)")
        self.folder = writable_folder(folder, "--output")

    def add(self, stem: str, name: str, array: np.ndarray) -> None:
        path = self.folder / f"{stem}.{name}.npy"
        try:
            np.save(path, array)
        except OSError as error:
            raise CLIError(f"cannot write {path}: {error}") from error

    def close(self) -> None:
        print(f"wrote .npy files to {self.folder}")


class SafetensorsWriter:
    """One safetensors file with keys `<stem>/<level>`, written at the end (safetensors cannot be appended to)."""

    def __init__(self, path: Path, metadata: dict[str, str]):
        if path.is_dir():
            raise CLIError(f"--output {path} is a folder (safetensors output is one file)")
        writable_folder(path.parent, "--output")  # checked now: the file is written after all the compute
        self.path = path
        self.metadata = metadata
        self.tensors: dict[str, np.ndarray] = {}

    def add(self, stem: str, name: str, array: np.ndarray) -> None:
        self.tensors[f"{stem}/{name}"] = np.ascontiguousarray(array)

    def close(self) -> None:
        # A temporary file renamed into place: the output appears whole or not at all.
        temporary = None
        try:
            handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            os.close(handle)
            save_file(self.tensors, temporary, metadata=self.metadata)
            os.replace(temporary, self.path)
        except OSError as error:
            raise CLIError(f"cannot write {self.path}: {error}") from error
        finally:
            if temporary is not None and os.path.exists(temporary):
                os.remove(temporary)
        print(f"wrote {len(self.tensors)} arrays to {self.path}")


def run_embed(args: argparse.Namespace) -> None:
    files = inspect_audio_files(args.audio)
    unique_stems(files)
    config = load_m2d2_config(args.model)
    is_clap = config.model_type == M2D2Config.model_type
    if args.level == "clap" and not is_clap:
        raise CLIError(
            f"--level clap needs an M2D2 CLAP model folder; {args.model} holds an audio encoder only (M2D2AudioModel)"
        )
    levels = {"clip": {"clip"}, "frame": {"frame"}, "clap": {"clap"}, "all": {"clip", "frame", "clap"}}[args.level]
    if not is_clap:
        levels.discard("clap")

    device = pick_device(args.device)
    feature_extractor = load_feature_extractor(args.model)
    check_long_enough(files, feature_extractor)
    fmt = args.format or ("safetensors" if args.output.suffix == ".safetensors" else "npy")
    if fmt == "npy":
        writer = NpyWriter(args.output)
    else:
        writer = SafetensorsWriter(args.output, {"model": str(args.model), "levels": ",".join(sorted(levels))})
    model = load_pretrained(AutoModel, args.model)
    prepare_model(model, device, args.bf16)
    audio_model = model.audio_model if is_clap else model

    with progress(len(files), "embed") as bar:
        for batch in batches_by_rate(files, args.batch_size):
            features = feature_extractor(
                [read_audio(file) for file in batch],
                sampling_rate=batch[0].sampling_rate,
                mono=True,  # [channels, samples] arrays are averaged to mono; 1-channel files pass unchanged
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                if "clap" in levels:
                    # One encoder pass serves all levels: get_audio_features keeps the tower's frame outputs and only
                    # replaces pooler_output, whose clip-level value is the masked frame mean.
                    outputs = model.get_audio_features(**features)
                    clap = outputs.pooler_output
                    clip = masked_mean(outputs.frame_features, outputs.frame_mask)
                else:
                    outputs = audio_model(**features)
                    clip = outputs.pooler_output
            frame_counts = outputs.frame_mask.sum(-1).tolist()
            for index, file in enumerate(batch):
                stem = file.path.stem
                if "clip" in levels:
                    writer.add(stem, "clip", clip[index].float().cpu().numpy())
                if "frame" in levels:
                    count = frame_counts[index]
                    writer.add(stem, "frames", outputs.frame_features[index, :count].float().cpu().numpy())
                    writer.add(stem, "timestamps", frame_timestamps(file.num_samples, count, file.sampling_rate))
                if "clap" in levels:
                    writer.add(stem, "clap", clap[index].float().cpu().numpy())
            bar.update(len(batch))
    writer.close()


# ---------------------------------------------------------------------------------------------------------------------
# zero-shot
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LabelledSet:
    """The rows of a metadata.csv that zero-shot scores against: resolved audio path → label, and the class names
    (the distinct labels of the whole file, so a split lacking a class still ranks it)."""

    targets: dict[Path, str]
    labels: list[str]

    @classmethod
    def read(cls, metadata: Path, label_column: str, split: str | None) -> "LabelledSet":
        try:
            rows, _ = metadata_rows(metadata, ("file_name",), all_strings=True)
        except (OSError, ValueError) as error:
            raise CLIError(f"cannot read --metadata {metadata}: {error}") from error
        for column in (label_column,) + (("split",) if split else ()):
            if column not in rows[0]:
                raise CLIError(f"--metadata {metadata} has no {column!r} column (columns: {', '.join(rows[0])})")
        labels = class_names([row[label_column] for row in rows])
        if split:
            rows = [row for row in rows if row["split"] == split]
        if not rows:
            where = f" with split {split!r}" if split else ""
            raise CLIError(f"--metadata {metadata} lists no clips{where}")
        root = metadata.parent
        return cls({(root / row["file_name"]).resolve(): row[label_column] for row in rows}, labels)

    def target(self, path: Path) -> str:
        try:
            return self.targets[path.resolve()]
        except KeyError:
            raise CLIError(f"{path} is not listed in --metadata (or not in its --split)") from None


def parse_labels(args: argparse.Namespace, labelled: LabelledSet | None = None) -> list[str]:
    if args.labels is None and args.labels_file is None:
        if labelled is None:
            raise CLIError("no labels given: pass --labels a,b,c, a --labels-file, or a labelled --metadata")
        return labelled.labels
    if args.labels_file is not None:
        try:
            text = args.labels_file.read_text(encoding="utf-8")
        except OSError as error:
            raise CLIError(f"cannot read --labels-file {args.labels_file}: {error}") from error
        separator = "\n"
    else:
        text, separator = args.labels, ","
    try:
        labels = parse_label_list(text, separator)
    except ValueError as error:
        raise CLIError(str(error)) from error
    if not labels:
        raise CLIError("no labels given: pass --labels a,b,c or a --labels-file with one label per line")
    return labels


def run_zero_shot(args: argparse.Namespace) -> None:
    if args.split and args.metadata is None:
        raise CLIError("--split selects rows of --metadata; pass --metadata too")
    labelled = LabelledSet.read(args.metadata, args.label_column, args.split) if args.metadata else None
    labels = parse_labels(args, labelled)
    config = load_m2d2_config(args.model)
    if config.model_type != M2D2Config.model_type:
        raise CLIError(f"zero-shot needs an M2D2 CLAP model folder; {args.model} holds an audio encoder only")
    template = args.template or config.zero_shot_template
    names = label_prompts(labels, template)
    if not args.audio and labelled is None:
        raise CLIError("no audio given: pass audio files, or --metadata to classify the files it lists")
    files = inspect_audio_files(args.audio or sorted(labelled.targets))
    targets = [labelled.target(file.path) for file in files] if labelled is not None else None
    unknown = sorted(set(targets or ()) - set(labels))
    if unknown:
        raise CLIError(f"--metadata labels {unknown[:5]} are not among the class names; add them to --labels")
    device = pick_device(args.device)
    feature_extractor = load_feature_extractor(args.model)
    check_long_enough(files, feature_extractor)
    tokenizer = load_pretrained(AutoProcessor, args.model, "the processor").tokenizer
    model = prepare_model(load_pretrained(M2D2ClapModel, args.model), device, args.bf16)
    # The zero-shot-audio-classification pipeline's computation (softmax over the labels of logits_per_audio),
    # batched: one forward pass per --batch-size files instead of one pipeline call per file.
    text_inputs = tokenizer([template.format(name) for name in names], return_tensors="pt", padding=True)
    text_inputs = text_inputs.to(device)
    label_names = list(names.values())
    results = []
    with progress(len(files), "zero-shot") as bar:
        for start in range(0, len(files), args.batch_size):
            batch = files[start : start + args.batch_size]
            rate = feature_extractor.sampling_rate
            features = feature_extractor(
                [mono_at(file, rate) for file in batch], sampling_rate=rate, return_tensors="pt"
            ).to(device)
            with torch.no_grad():
                logits = model(**text_inputs, **features.to(model.dtype)).logits_per_audio
            all_scores = logits.float().softmax(-1).cpu()
            for file, scores in zip(batch, all_scores):
                order = scores.argsort(descending=True, stable=True)[: args.top_k].tolist()
                predictions = [{"label": label_names[i], "score": float(scores[i])} for i in order]
                results.append({"file": str(file.path), "predictions": predictions})
            bar.update(len(batch))
    summary = None
    if targets is not None:
        for result, target in zip(results, targets):
            result["target"] = target
        correct = sum(result["predictions"][0]["label"] == result["target"] for result in results)
        summary = {
            "num_files": len(results),
            "correct": correct,
            "top1_accuracy": correct / len(results),
            "num_labels": len(labels),
            "chance_accuracy": 1 / len(labels),
        }
    print_results(results, as_json=args.json, summary=summary)


def print_results(results: list[dict], as_json: bool, summary: dict | None = None) -> None:
    """Prints the predictions as JSON or as one block per file: rank, label, score (and the target and accuracy
    when the files are labelled)."""
    if as_json:
        print(json.dumps(results if summary is None else {**summary, "results": results}, indent=2))
        return
    width = max(len(p["label"]) for result in results for p in result["predictions"])
    for result in results:
        target = f"  (target: {result['target']})" if "target" in result else ""
        print(f"{result['file']}{target}")
        for rank, prediction in enumerate(result["predictions"], 1):
            print(f"  {rank:>2}  {prediction['label']:<{width}}  {prediction['score']:.4f}")
    if summary is not None:
        print(
            f"top-1 accuracy {summary['top1_accuracy']:.3f} ({summary['correct']}/{summary['num_files']} files); "
            f"chance 1/{summary['num_labels']} = {summary['chance_accuracy']:.3f}"
        )


__all__ = ["CLIError", "add_convert_arguments", "build_parser", "main", "run"]


# ---------------------------------------------------------------------------------------------------------------------
# timeline
# ---------------------------------------------------------------------------------------------------------------------


def run_timeline(args: argparse.Namespace) -> None:
    from .timeline import plot_timeline, sound_event_timeline

    queries = [query.strip() for query in args.queries.split(",") if query.strip()]
    if not queries:
        raise CLIError("no queries given: pass --queries 'a dog barks,a bell rings'")
    if args.output.suffix.lower() != ".png":
        raise CLIError(f"--output must name a .png file, got {args.output}")
    (file,) = inspect_audio_files([args.audio])
    config = load_m2d2_config(args.model)
    if config.model_type != M2D2Config.model_type:
        raise CLIError(f"timeline needs an M2D2 CLAP model folder; {args.model} holds an audio encoder only")
    device = pick_device(args.device)
    processor = load_pretrained(AutoProcessor, args.model, "the processor")
    rate = processor.feature_extractor.sampling_rate
    shortest = processor.feature_extractor.min_samples / rate
    if args.window < shortest:
        raise CLIError(f"--window {args.window:g} s is shorter than the model's shortest input ({shortest:g} s)")
    if round(args.hop * rate) < 1:
        raise CLIError(f"--hop {args.hop:g} s is shorter than one sample at {rate} Hz")
    check_long_enough([file], processor.feature_extractor)
    writable_folder(args.output.parent, "--output")  # before the model loads and computes, not after
    model = prepare_model(load_pretrained(M2D2ClapModel, args.model), device, args.bf16)
    wave = mono_at(file, rate)
    timeline = sound_event_timeline(model, processor, wave, queries, args.window, args.hop)
    try:
        png = plot_timeline(timeline, wave, rate, args.output, title=file.path.name)
        csv_path, json_path = timeline.save(args.output.with_suffix(""))
    except OSError as error:
        raise CLIError(f"cannot write the timeline next to {args.output}: {error}") from error
    for query, row in zip(timeline.queries, timeline.similarities):
        peak = int(np.argmax(row))
        print(f"{query}: peak {row[peak]:.3f} at {timeline.times[peak]:.2f} s")
    print(f"wrote {png}, {csv_path} and {json_path}")


if __name__ == "__main__":  # `python -m m2d2_hf.cli`, the same as the m2d2-hf console script
    raise SystemExit(main())
