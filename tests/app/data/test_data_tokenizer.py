from __future__ import annotations

import string

from transformers import AutoTokenizer

from lightning_grass.app.data import build_char_tokenizer

TEXT = "Tom has 5 apples.\n  He buys 3 more , gives away 2 ?\n\n\t#### 6 ~`{}|\\ \"quotes\" 'x'"


def test_vocabulary_and_special_tokens():
    tok = build_char_tokenizer()
    assert len(tok) == 4 + len(string.printable) - 2 == 102
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.bos_token, tok.eos_token, tok.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")


def test_round_trip_one_token_per_character():
    tok = build_char_tokenizer()
    printable = string.printable.replace("\x0b", "").replace("\x0c", "")
    for text in (TEXT, printable, "  leading and trailing  ", "\n", "a  b"):
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == len(text)
        assert tok.decode(ids) == text
    assert len(set(tok.encode(printable, add_special_tokens=False))) == len(printable)


def test_encode_adds_no_special_tokens():
    tok = build_char_tokenizer()
    assert tok.encode("ab") == tok.encode("ab", add_special_tokens=False) == tok.convert_tokens_to_ids(["a", "b"])
    assert tok("ab")["input_ids"] == tok.convert_tokens_to_ids(["a", "b"])


def test_unknown_characters_map_to_unk():
    tok = build_char_tokenizer()
    ids = tok.encode("aé€b\x0c", add_special_tokens=False)
    assert ids == [tok.convert_tokens_to_ids("a"), 3, 3, tok.convert_tokens_to_ids("b"), 3]
    assert tok.decode(ids) == "a<unk><unk>b<unk>"
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_save_and_reload_with_auto_tokenizer(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT, add_special_tokens=False)
    assert reloaded.encode(TEXT) == tok.encode(TEXT)
    assert reloaded.decode(tok.encode(TEXT)) == TEXT
    assert (reloaded.pad_token_id, reloaded.eos_token_id, reloaded.bos_token_id, reloaded.unk_token_id) == (0, 2, 1, 3)
    assert len(reloaded) == len(tok)
    assert reloaded.encode("é", add_special_tokens=False) == [3]


def test_vocabulary_config_matches_the_tokenizer():
    from lightning_grass.app.data import build_char_tokenizer, vocabulary_config

    tokenizer = build_char_tokenizer()
    assert vocabulary_config(tokenizer) == {"vocab_size": 102, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
