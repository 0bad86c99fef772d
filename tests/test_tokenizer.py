import logging
from pathlib import Path

import pytest
from transformers import CLIPTokenizer

from engine.errors import InputError
from engine.tokenizer import ClipTokenizer

TEXTS = [
    "make the circle blue", "", "MAKE IT SNOWY", "Turn it into a Van Gogh painting!!", "a   b\tc 123 it's",
    "add 3 dogs, 2 cats; and 1,000 birds?", "ünïcödé café", "日本の夏にして", "turn her into a 🐱 with 🔥🔥",
    "it'S NOT what you'd think—really…", "  leading and trailing  ", "remove the <|endoftext|> marker",
    "make it red and " * 30,  # over 77 tokens: truncated
]


@pytest.fixture(scope="module", params=["vocab.json + merges.txt", "tokenizer.json"])
def tokenizer_folder(request, tiny_model, tmp_path_factory) -> Path:
    """The tiny model's tokenizer as written by hand (vocab.json, merges.txt), and as transformers' own
    save_pretrained writes it today (tokenizer.json only)."""
    folder = Path(tiny_model) / "tokenizer"
    if request.param == "tokenizer.json":
        saved = tmp_path_factory.mktemp("tokenizer")
        CLIPTokenizer.from_pretrained(folder).save_pretrained(saved)
        assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
        return saved
    return folder


def test_ids_match_transformers_clip_tokenizer(tokenizer_folder, caplog):
    ref = CLIPTokenizer.from_pretrained(tokenizer_folder)
    with caplog.at_level(logging.WARNING):
        ours = ClipTokenizer(tokenizer_folder)(TEXTS)
    for row, text in zip(ours, TEXTS):
        assert row.tolist() == ref(text, padding="max_length", max_length=77, truncation=True).input_ids, text
    assert "truncated" in caplog.text


def test_long_instruction_truncated_with_warning(tiny_model, caplog):
    tok = ClipTokenizer(Path(tiny_model) / "tokenizer")
    with caplog.at_level(logging.WARNING):
        ids = tok(["make it red " * 60])
    assert ids.shape == (1, 77) and ids[0, -1] == tok.eos_id and ids[0, 0] == tok.bos_id
    assert "truncated" in caplog.text


def test_missing_or_broken_tokenizer_files_are_named(tmp_path):
    with pytest.raises(InputError, match=r"no tokenizer: need tokenizer.json, or vocab.json and merges.txt "
                                         r"\(vocab.json, merges.txt missing\)"):
        ClipTokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="tokenizer.json: not a readable tokenizer file"):
        ClipTokenizer(tmp_path)
