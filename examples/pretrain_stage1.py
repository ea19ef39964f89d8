"""Stage-1 M2D2 pre-training (M2D + CLAP against cached caption embeddings).

    accelerate launch examples/pretrain_stage1.py --train_data DATA --caption_embeddings CAPTIONS \
        --output_dir OUT --max_train_steps N

All options: `python examples/pretrain_stage1.py --help`. The program lives in `m2d2_hf.training.stage1`.
"""

from m2d2_hf.training.stage1 import main


if __name__ == "__main__":
    main()
