"""Stage-1.1 M2D2 fine-tuning: audio classification from an M2D2 encoder folder.

    accelerate launch examples/finetune_audio_classification.py --model_name_or_path ENCODER \
        --train_data DATA --label_column label --output_dir OUT --max_train_steps N \
        [--multi_label --label_separator ";"] [--eval_filter split=test --eval_steps 3125]

The final folder (`OUT/final`) loads in `pipeline("audio-classification", model="OUT/final")`.
All options: `python examples/finetune_audio_classification.py --help`. The program lives in
`m2d2_hf.training.finetune`.
"""

from m2d2_hf.training.finetune import main


if __name__ == "__main__":
    main()
