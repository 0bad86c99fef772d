import logging
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from engine.errors import InputError
from engine.tokenizer import ClipTokenizer

TEXTS = ["make the circle blue", "", "Turn it into a Van Gogh painting!!", "a   b\tc 123 it's", "ünïcödé café"]


def test_ids_match_transformers_clip_tokenizer(tiny_model):
    folder = Path(tiny_model) / "tokenizer"
    ref = CLIPTokenizer.from_pretrained(folder)
    ours = ClipTokenizer(folder)(TEXTS)
    for row, text in zip(ours, TEXTS):
        assert row.tolist() == ref(text, padding="max_length", max_length=77, truncation=True).input_ids


def test_long_instruction_truncated_with_warning(tiny_model, caplog):
    tok = ClipTokenizer(Path(tiny_model) / "tokenizer")
    with caplog.at_level(logging.WARNING):
        ids = tok(["make it red " * 60])
    assert ids.shape == (1, 77) and ids[0, -1] == tok.eos_id and ids[0, 0] == tok.bos_id
    assert "truncated" in caplog.text


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(InputError, match="vocab.json"):
        ClipTokenizer(tmp_path)
