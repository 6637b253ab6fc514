import json

import pytest

from captioner.data.vocab import BOS_ID, EOS_ID, PAD_ID, SPECIALS, UNK_ID, Vocabulary

CAPTIONS = ["A dog runs.", "a dog sits", "The dog runs fast!", "a cat", "a cat sleeps"]


def test_specials_come_first_with_fixed_ids():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    assert vocab.itos[:4] == list(SPECIALS)
    assert (vocab.pad_id, vocab.bos_id, vocab.eos_id, vocab.unk_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)


def test_count_threshold_and_deterministic_order():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    # frequency first ("a": 4, "dog": 3), then alphabetical among equals ("cat", "runs": 2)
    assert vocab.itos[4:] == ["a", "dog", "cat", "runs"]
    assert Vocabulary.build(list(reversed(CAPTIONS)), min_count=2) == vocab


def test_rare_words_become_unk_and_punctuation_is_dropped():
    vocab = Vocabulary.build(CAPTIONS, min_count=2)
    ids = vocab.encode("A dog sleeps.")
    assert ids == [BOS_ID, vocab.stoi["a"], vocab.stoi["dog"], UNK_ID, EOS_ID]


def test_encode_decode_round_trip_and_max_length():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    assert vocab.decode(vocab.encode("The dog runs fast!")) == "the dog runs fast"
    assert vocab.encode("the dog runs fast", max_length=2) == [BOS_ID, vocab.stoi["the"], vocab.stoi["dog"], EOS_ID]
    # decoding stops at <eos> and skips <bos>/<pad>
    assert vocab.decode([BOS_ID, vocab.stoi["cat"], EOS_ID, vocab.stoi["dog"], PAD_ID]) == "cat"


def test_json_save_load(tmp_path):
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocabulary.load(path) == vocab
    assert json.loads(path.read_text())["itos"][:4] == list(SPECIALS)


def test_rejects_vocabulary_without_specials():
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])
