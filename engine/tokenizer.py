"""CLIP's byte-level BPE tokenizer on the light ``tokenizers`` library, from whichever files a folder has:
``tokenizer.json`` (what transformers 5 writes) or ``vocab.json`` + ``merges.txt`` (older saves).

Gives the same ids as transformers' CLIPTokenizer without importing transformers or torch, so the
minimal runtime can use it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from engine.errors import InputError, one_line, quote_error

log = logging.getLogger(__name__)

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, other symbol runs.
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
FAST_FILE = "tokenizer.json"
BPE_FILES = ("vocab.json", "merges.txt")


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def load_bpe(folder: Path) -> Tokenizer:
    """The bare BPE tokenizer (no special tokens, padding or truncation) from ``tokenizer.json``, else from
    ``vocab.json`` + ``merges.txt``."""
    if (folder / FAST_FILE).is_file():
        try:
            tokenizer = Tokenizer.from_file(str(folder / FAST_FILE))
        except Exception as err:  # tokenizers raises a bare Exception on malformed files
            raise InputError(f"{folder / FAST_FILE}: not a readable tokenizer file ({quote_error(err)})") from None
        tokenizer.no_padding()
        tokenizer.no_truncation()
        return tokenizer
    missing = [name for name in BPE_FILES if not (folder / name).is_file()]
    if missing:
        raise InputError(f"{folder}: no tokenizer: need {FAST_FILE}, or {' and '.join(BPE_FILES)} "
                         f"({', '.join(missing)} missing)")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    tokenizer = Tokenizer(
        BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
            unk_token="<|endoftext|>")
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


class ClipTokenizer:
    """Text -> (B, max_length) int64 ids: <start> tokens <end> padding, truncated with a warning."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self._tokenizer = load_bpe(folder)
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        bos = _token_text(settings.get("bos_token")) or "<|startoftext|>"
        eos = _token_text(settings.get("eos_token")) or "<|endoftext|>"
        pad = _token_text(settings.get("pad_token")) or eos
        self.max_length = int(min(settings.get("model_max_length", 77), 77))
        ids = {token: self._tokenizer.token_to_id(token) for token in (bos, eos, pad)}
        unknown = [token for token, i in ids.items() if i is None]
        if unknown:
            raise InputError(f"{folder}: the tokenizer's vocabulary has no {', '.join(unknown)}")
        self._tokenizer.add_special_tokens(list(ids))  # matched whole in the text, as transformers does
        self.bos_id, self.eos_id, self.pad_id = ids[bos], ids[eos], ids[pad]

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), max_length) int64; an empty text is just <start><end> and padding."""
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        room = self.max_length - 2
        for row, text in enumerate(texts):
            tokens = self._tokenizer.encode(text.strip(), add_special_tokens=False).ids
            if len(tokens) > room:
                log.warning("instruction is %d tokens, over CLIP's %d; truncated: %r", len(tokens), room,
                            one_line(text, 80))
                tokens = tokens[:room]
            seq = [self.bos_id, *tokens, self.eos_id]
            ids[row, : len(seq)] = seq
        return ids
