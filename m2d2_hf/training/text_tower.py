"""Shrinking a pretrained BERT-family text tower for small models (the demo model's all-MiniLM-L6-v2).

A WordPiece tower is mostly vocabulary: all-MiniLM-L6-v2 holds 11.7 M of its 22.7 M parameters in the 30522 x 384
token table. Keeping its first layers, its most frequent words and every single-character piece gives a tower that
still tokenises any lower-case text (unknown words fall back to sub-word or character pieces, never to [UNK] when
their characters are kept) at a fraction of the size. BERT vocabularies list whole words by corpus frequency after
the special tokens and the characters, so "the first N words" are the N most frequent ones.
"""

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertTokenizer


def _is_character(token: str) -> bool:
    return len(token) == 1 or (token.startswith("##") and len(token) == 3)


def select_vocabulary(
    vocab: dict[str, int], num_words: int, special_tokens: Iterable[str], required_tokens: Iterable[str] = ()
) -> list[int]:
    """Ids to keep, in their original order: the special tokens, every character piece, the `num_words` most frequent
    other tokens (the lowest ids that are not `[unusedN]` placeholders) and `required_tokens`."""
    if num_words < 0:
        raise ValueError(f"num_words must be >= 0, got {num_words}")
    special, required = set(special_tokens), set(required_tokens)
    missing = sorted((special | required) - set(vocab))
    if missing:
        raise ValueError(f"tokens {missing[:5]} are not in the vocabulary")
    keep, words = set(), 0
    for token, index in sorted(vocab.items(), key=lambda item: item[1]):
        if token in special or token in required or _is_character(token):
            keep.add(index)
        elif words < num_words and not token.startswith("[unused"):
            keep.add(index)
            words += 1
    return sorted(keep)


def shrink_text_tower(
    source: str | Path,
    output_dir: str | Path,
    num_hidden_layers: int | None = None,
    num_words: int | None = None,
    max_position_embeddings: int | None = None,
    required_texts: Iterable[str] = (),
) -> Path:
    """Writes a smaller copy of a BERT-family text model and its WordPiece tokenizer to `output_dir`.

    Args:
        source: folder (or hub id) of a `BertModel`-like model with a WordPiece tokenizer.
        num_hidden_layers: keep the first N transformer layers (None: all).
        num_words: keep the N most frequent non-character tokens besides the special and character tokens (None:
            the whole vocabulary).
        max_position_embeddings: keep the first N positions (None: all); the tokenizer's maximum length follows.
        required_texts: texts whose tokens (under the original vocabulary) are kept whatever their frequency, so
            they tokenise exactly as before (e.g. the class names of a demo).

    Returns:
        `output_dir`, loadable with `AutoModel` / `AutoTokenizer`.
    """
    model = AutoModel.from_pretrained(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = model.config
    if getattr(model, "encoder", None) is None or not hasattr(model.encoder, "layer"):
        raise ValueError(f"{source} is not a BERT-like encoder (no encoder.layer); cannot shrink it")
    vocab = tokenizer.get_vocab()
    if any(token.startswith("Ġ") or token.startswith("▁") for token in list(vocab)[:2000]):
        raise ValueError(f"{source} does not use a WordPiece vocabulary; only BERT-style vocabularies can be pruned")

    if num_hidden_layers is not None:
        if not 1 <= num_hidden_layers <= config.num_hidden_layers:
            raise ValueError(f"num_hidden_layers must be in [1, {config.num_hidden_layers}], got {num_hidden_layers}")
        model.encoder.layer = nn.ModuleList(model.encoder.layer[:num_hidden_layers])
        config.num_hidden_layers = num_hidden_layers

    embeddings = model.embeddings
    if max_position_embeddings is not None:
        if not 2 <= max_position_embeddings <= config.max_position_embeddings:
            raise ValueError(
                f"max_position_embeddings must be in [2, {config.max_position_embeddings}], "
                f"got {max_position_embeddings}"
            )
        embeddings.position_embeddings = _rows(embeddings.position_embeddings, torch.arange(max_position_embeddings))
        embeddings.register_buffer(
            "position_ids", torch.arange(max_position_embeddings).unsqueeze(0), persistent=False
        )
        if hasattr(embeddings, "token_type_ids"):
            embeddings.register_buffer(
                "token_type_ids", torch.zeros(1, max_position_embeddings, dtype=torch.long), persistent=False
            )
        config.max_position_embeddings = max_position_embeddings

    kept_tokens = vocab
    if num_words is not None:
        required = {token for text in required_texts for token in tokenizer.tokenize(text)}
        ids = select_vocabulary(vocab, num_words, tokenizer.all_special_tokens, required)
        by_id = {index: token for token, index in vocab.items()}
        kept_tokens = {by_id[index]: position for position, index in enumerate(ids)}
        config.vocab_size = len(ids)
        config.pad_token_id = kept_tokens[tokenizer.pad_token]
        embeddings.word_embeddings = _rows(embeddings.word_embeddings, torch.tensor(ids), config.pad_token_id)

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    small = BertTokenizer(
        vocab=kept_tokens,
        do_lower_case=tokenizer.init_kwargs.get("do_lower_case", True),
        strip_accents=tokenizer.init_kwargs.get("strip_accents"),
        tokenize_chinese_chars=tokenizer.init_kwargs.get("tokenize_chinese_chars", True),
        model_max_length=config.max_position_embeddings,
    )
    small.save_pretrained(output_dir)
    (output_dir / "shrink_text_tower.json").write_text(
        json.dumps(
            {
                "source": str(source),
                "num_hidden_layers": config.num_hidden_layers,
                "vocab_size": config.vocab_size,
                "max_position_embeddings": config.max_position_embeddings,
            },
            indent=2,
        )
    )
    return output_dir


def _rows(table: nn.Embedding, rows: torch.Tensor, padding_idx: int | None = None) -> nn.Embedding:
    """A new embedding holding the given rows of `table`, in that order."""
    smaller = nn.Embedding(len(rows), table.embedding_dim, padding_idx=padding_idx)
    smaller.weight.data.copy_(table.weight.data[rows])
    return smaller
