"""The CLIP tokenizer, built offline from the BPE table open_clip ships.

Stable Diffusion 1.x uses OpenAI's CLIP BPE tokenizer. Its merge table is bundled
with open_clip (``bpe_simple_vocab_16e6.txt.gz``), so the tiny checkpoint can carry
a real tokenizer without reaching the model hub. The vocabulary is derived the
way CLIP derives it: the 256 byte symbols, the same with the end-of-word mark,
one token per merge, then the two special tokens (49408 in all).
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

BPE_RESOURCE = "bpe_simple_vocab_16e6.txt.gz"
# CLIP's vocabulary size is 49408 = 2 * 256 byte symbols + merges + 2 specials,
# so it uses the first 49408 - 512 - 2 merges of the table.
MERGE_COUNT = 49408 - 2 * 256 - 2
END_OF_WORD = "</w>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# CLIP's text encoder has 77 positions; without this the SD pipeline overflows
# ("int too big to convert") because the tokenizer's default max is huge.
MODEL_MAX_LENGTH = 77
MERGES_HEADER = "#version: 0.2"
# SDXL's second tokenizer (OpenCLIP ViT-bigG's) pads with "!" (id 0) where
# OpenAI's pads with the end token; its text encoder reads the pooled output at
# the first end token either way.
OPENCLIP_PAD_TOKEN = "!"


def _read_merges() -> list[str]:
    packed = (resources.files("open_clip") / BPE_RESOURCE).read_bytes()
    lines = gzip.decompress(packed).decode("utf-8").split("\n")
    # Line 0 is a header, not a merge.
    return lines[1 : 1 + MERGE_COUNT]


def _vocabulary(merges: list[str]) -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + END_OF_WORD for symbol in byte_symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def build_clip_tokenizer(out_dir: Path, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """Write ``vocab.json`` and ``merges.txt`` into ``out_dir`` and load them."""
    from transformers import CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    merges = _read_merges()
    vocab_path = out_dir / "vocab.json"
    merges_path = out_dir / "merges.txt"
    vocab_path.write_text(json.dumps(_vocabulary(merges), ensure_ascii=False), "utf-8")
    merges_path.write_text("\n".join([MERGES_HEADER, *merges]) + "\n", "utf-8")
    # transformers 5 ignores `vocab_file=`/`merges_file=` keywords here (the
    # tokenizer comes out empty); `vocab=`/`merges=` accept the file paths.
    return CLIPTokenizer(
        vocab=str(vocab_path),
        merges=str(merges_path),
        model_max_length=MODEL_MAX_LENGTH,
        pad_token=pad_token,
    )
