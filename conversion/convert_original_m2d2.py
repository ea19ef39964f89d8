"""Convert an original NTT M2D / M2D-CLAP / M2D2 `.pth` checkpoint into a transformers `save_pretrained` folder.

    python conversion/convert_original_m2d2.py CHECKPOINT OUT_DIR [--tokenizer DIR_OR_ID] [--text-model DIR_OR_ID]
        [--text-pooling cls|mean] [--input-size 80x1001] [--patch-size 16x16] [--sampling-rate 16000] [--encoder-only]
        [--overwrite]

The same as `m2d2-hf convert`: the arguments and the error handling come from `m2d2_hf.cli`, the conversion from
`m2d2_hf.conversion.convert_checkpoint`.
"""

import argparse
import sys

from m2d2_hf.cli import add_convert_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="convert_original_m2d2.py",
        description="Convert an original M2D / M2D-CLAP / M2D2 .pth checkpoint into a save_pretrained folder.",
    )
    add_convert_arguments(parser)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
