"""Stage-2 / 2.1 M2D2 CLAP training: a text tower and a new audio projector against the frozen audio encoder.

    accelerate launch examples/pretrain_stage2.py --train_data DATA --audio_model STAGE1_1_ENCODER \
        --text_model google-bert/bert-base-uncased --output_dir OUT --max_train_steps N
    # stage 2.1: --model_name_or_path OUT/final --mask_ratio 0 (on WavCaps + AudioCaps + Clotho)

All options: `python examples/pretrain_stage2.py --help`. The program lives in `m2d2_hf.training.stage2`.
"""

from m2d2_hf.training.stage2 import main


if __name__ == "__main__":
    main()
