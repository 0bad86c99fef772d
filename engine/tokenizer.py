"""CLIP's byte-level BPE tokenizer from ``vocab.json`` + ``merges.txt``, on the light ``tokenizers`` library.

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

from engine.errors import InputError

log = logging.getLogger(__name__)

# CLIP's pre-tokenisation: special tokens, English contractions, letter runs, single digits, other symbol runs.
_CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


class ClipTokenizer:
    """Text -> (B, max_length) int64 ids: <start> tokens <end> padding, truncated with a warning."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise InputError(f"{folder}: tokenizer file {name} is missing")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            if (folder / name).is_file():
                settings.update(json.loads((folder / name).read_text(encoding="utf-8")))
        bos = _token_text(settings.get("bos_token")) or "<|startoftext|>"
        eos = _token_text(settings.get("eos_token")) or "<|endoftext|>"
        pad = _token_text(settings.get("pad_token")) or eos
        self.max_length = int(min(settings.get("model_max_length", 77), 77))
        self.bos_id, self.eos_id, self.pad_id = vocab[bos], vocab[eos], vocab[pad]
        tokenizer = Tokenizer(
            BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=eos)
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
        self._tokenizer = tokenizer

    def __call__(self, texts: list[str]) -> np.ndarray:
        """(len(texts), max_length) int64; an empty text is just <start><end> and padding."""
        ids = np.full((len(texts), self.max_length), self.pad_id, dtype=np.int64)
        room = self.max_length - 2
        for row, text in enumerate(texts):
            tokens = self._tokenizer.encode(text.strip(), add_special_tokens=False).ids
            if len(tokens) > room:
                log.warning("instruction is %d tokens, over CLIP's %d; truncated: %r", len(tokens), room, text)
                tokens = tokens[:room]
            seq = [self.bos_id, *tokens, self.eos_id]
            ids[row, : len(seq)] = seq
        return ids
