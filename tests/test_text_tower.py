"""Shrinking a BERT text tower: fewer layers, a pruned WordPiece vocabulary, fewer positions."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from m2d2_hf.training.text_tower import select_vocabulary, shrink_text_tower

from .conftest import minilm_dir


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory):
    source = minilm_dir()
    output = shrink_text_tower(
        source,
        tmp_path_factory.mktemp("tower"),
        num_hidden_layers=2,
        num_words=3000,
        max_position_embeddings=64,
        required_texts=["a xylophone plays"],
    )
    return source, output


def test_vocabulary_keeps_specials_characters_frequent_words_and_required():
    vocab = {"[PAD]": 0, "[unused0]": 1, "[UNK]": 2, "a": 3, "b": 4, "the": 5, "of": 6, "rare": 7, "##x": 8, "##ly": 9}
    kept = select_vocabulary(vocab, num_words=1, special_tokens=["[PAD]", "[UNK]"], required_tokens=["rare"])
    # "the" is the one frequent word; "of" and "##ly" fall out; the placeholder never counts as a word.
    assert kept == [0, 2, 3, 4, 5, 7, 8]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        select_vocabulary(vocab, 1, ["[PAD]"], ["missing"])
    with pytest.raises(ValueError, match="num_words"):
        select_vocabulary(vocab, -1, ["[PAD]"])


def test_shrunk_tower_matches_the_original_first_layers(shrunk):
    source, output = shrunk
    original, small = AutoModel.from_pretrained(source).eval(), AutoModel.from_pretrained(output).eval()
    tokenizer, small_tokenizer = AutoTokenizer.from_pretrained(source), AutoTokenizer.from_pretrained(output)
    assert small.config.num_hidden_layers == 2 and small.config.max_position_embeddings == 64
    # 3000 words, about 2000 single-character pieces (many scripts), the special and required tokens.
    assert small.config.vocab_size == len(small_tokenizer) < 3000 + 2100
    assert small_tokenizer.model_max_length == 64

    text = "the dog and a xylophone"  # frequent words plus a required one: tokenised exactly as before
    assert small_tokenizer.tokenize(text) == tokenizer.tokenize(text)
    with torch.no_grad():
        expected = original(**tokenizer(text, return_tensors="pt"), output_hidden_states=True).hidden_states[2]
        actual = small(**small_tokenizer(text, return_tensors="pt")).last_hidden_state
    # The original's layer-2 output passes no further layers; the small tower's last layer is that layer.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_shrunk_tokenizer_never_falls_back_to_unknown_for_plain_text(shrunk):
    _, output = shrunk
    tokenizer = AutoTokenizer.from_pretrained(output)
    pieces = tokenizer.tokenize("an extraordinarily quizzical hippopotamus")
    assert tokenizer.unk_token not in pieces and len(pieces) > 3


def test_shrink_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="num_hidden_layers"):
        shrink_text_tower(minilm_dir(), tmp_path, num_hidden_layers=7)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        shrink_text_tower(minilm_dir(), tmp_path, max_position_embeddings=1000)
