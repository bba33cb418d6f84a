"""open_clip's CLIP tokenizer without torch: text in, int64 token ids out, for onnxruntime.

A line-for-line re-implementation of ``open_clip.tokenizer.SimpleTokenizer`` (the
tokenizer ``open_clip.get_tokenizer("ViT-B-16")`` returns) and its ``__call__``: the
same cleaning (ftfy, HTML unescaping twice, whitespace collapsing, lower-casing), the
same pre-tokenising pattern, the same byte-level BPE over the same merge table, the same
start/end tokens, zero padding and truncation that keeps the end token. The API process
imports this module, so it must not import torch or open_clip (which imports torch):
the merge table is read from an exported encoder directory, or, for tests, found inside
the installed open_clip package without executing it.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path

import ftfy
import numpy as np
import numpy.typing as npt
import regex

BPE_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# open_clip keeps merges[1 : 49152 - 256 - 2 + 1] of the file (line 0 is a header):
# 48894 merges, so that 2 * 256 byte symbols + merges + 2 specials = 49408 tokens.
MERGE_COUNT = 49152 - 256 - 2
END_OF_WORD = "</w>"
# open_clip's spelling (OpenAI's CLIP and transformers write <|startoftext|>); only the
# ids reach the model, but a query containing this literal text maps to them the same way.
START_TOKEN = "<start_of_text>"
END_TOKEN = "<end_of_text>"
# Every open_clip CLIP text tower with the SimpleTokenizer has 77 positions.
DEFAULT_CONTEXT_LENGTH = 77
# Distinct words whose BPE split is remembered. open_clip's cache is unbounded, which in
# a long-lived API process fed by users is a slow leak; a query has a handful of words.
BPE_CACHE_WORDS = 100_000

# open_clip's pre-tokenising pattern; the special tokens are matched before it.
_WORD_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # letters, digits, rest
)


def bundled_vocab_path() -> Path:
    """The BPE file inside the installed open_clip package, found without importing it."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: no bundled BPE vocabulary")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table: printable Latin-1 bytes map to
    themselves, the others to code points from 256 up. Its order (printable bytes first,
    then the rest in byte order) is the order of the first 256 token ids."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + len(table) - len(printable))
    return table


@functools.cache
def _read_merges(vocab_path: Path) -> tuple[tuple[str, str], ...]:
    """The merge table of a BPE file, read once per file per process."""
    lines = gzip.decompress(vocab_path.read_bytes()).decode("utf-8").split("\n")
    pairs = [line.split() for line in lines[1 : 1 + MERGE_COUNT]]
    return tuple((pair[0], pair[1]) for pair in pairs)


def _clean(text: str) -> str:
    """open_clip's ``clean='lower'``: basic_clean, whitespace_clean, then lower()."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


def _symbol_pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(itertools.pairwise(word))


class ClipTokenizer:
    """open_clip's SimpleTokenizer (``clean='lower'``, no reduction mask), returning numpy."""

    def __init__(self, vocab_path: Path, context_length: int = DEFAULT_CONTEXT_LENGTH) -> None:
        merges = _read_merges(vocab_path)
        byte_symbols = list(_bytes_to_unicode().values())
        tokens = byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]
        tokens += ["".join(merge) for merge in merges]
        tokens += [START_TOKEN, END_TOKEN]
        self.encoder = {token: index for index, token in enumerate(tokens)}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[START_TOKEN]
        self.eot_token_id = self.encoder[END_TOKEN]
        self.context_length = context_length
        self._pattern = regex.compile(
            f"{START_TOKEN}|{END_TOKEN}|{_WORD_PATTERN}", regex.IGNORECASE
        )
        self._bpe = functools.lru_cache(maxsize=BPE_CACHE_WORDS)(self._bpe_uncached)

    def _bpe_uncached(self, token: str) -> tuple[str, ...]:
        """Split one pre-token (already mapped to byte symbols) into vocabulary entries."""
        if token in (START_TOKEN, END_TOKEN):
            return (token,)
        word = (*token[:-1], token[-1] + END_OF_WORD)
        pairs = _symbol_pairs(word)
        while pairs:
            # The lowest-ranked known pair merges first, everywhere in the word at once.
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, len(self.bpe_ranks)))
            if bigram not in self.bpe_ranks:
                break
            word = _merge_pair(word, bigram)
            pairs = _symbol_pairs(word) if len(word) > 1 else set()
        return word

    def encode(self, text: str) -> list[int]:
        """Token ids of one text, without start/end tokens or padding."""
        byte_encoder = _bytes_to_unicode()
        ids: list[int] = []
        for piece in self._pattern.findall(_clean(text)):
            symbols = "".join(byte_encoder[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.encoder[entry] for entry in self._bpe(symbols))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> npt.NDArray[np.int64]:
        """``[len(texts), context_length]`` int64 ids, as open_clip's ``tokenizer(texts)``."""
        if isinstance(texts, str):
            texts = [texts]
        result = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > self.context_length:
                # Truncated, but the end token stays: the text tower pools at the end token.
                ids = ids[: self.context_length]
                ids[-1] = self.eot_token_id
            result[row, : len(ids)] = ids
        return result


def _merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """Replace every non-overlapping occurrence of ``pair``, left to right."""
    first, second = pair
    merged: list[str] = []
    index = 0
    while index < len(word):
        if index < len(word) - 1 and word[index] == first and word[index + 1] == second:
            merged.append(first + second)
            index += 2
        else:
            merged.append(word[index])
            index += 1
    return tuple(merged)
