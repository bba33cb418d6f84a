"""The rare tokens: no word or common acronym, each one CLIP BPE token, the list
the derivation gives; and the base-model screen's wiring on the tiny profile."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.ml.tokenizer import END_OF_WORD
from core.rare_tokens import (
    RARE_TOKENS,
    derive_rare_tokens,
    encodes_as_one_token,
    is_rare_in_text,
)

# Acronyms with strong priors the old list held (visual effects, the motorcycle
# maker, the Pacific Northwest, R&B, ...).
ACRONYMS = ("vfx", "ktm", "pnw", "rnb", "nds", "lds", "smb", "trx", "gsm", "pbr", "mrt", "chf")
# _free_token gives each subject of an account its own token while any is free;
# a run trains at most ATELIER_MAX_SUBJECTS_PER_RUN (4) together. Room to spare:
MIN_TOKENS = 32


@pytest.mark.parametrize("acronym", ACRONYMS)
def test_the_filter_rejects_common_acronyms(acronym: str) -> None:
    assert not is_rare_in_text(acronym)


def test_no_chosen_token_is_a_common_word_or_acronym() -> None:
    assert not set(ACRONYMS) & set(RARE_TOKENS)
    assert [token for token in RARE_TOKENS if not is_rare_in_text(token)] == []


def test_every_token_is_one_clip_token_in_a_caption(tiny_model_dir: Path) -> None:
    """Through transformers' CLIPTokenizer of the tiny checkpoint (CLIP's real
    vocabulary, which SD 1.x and both SDXL tokenizers share), not the derivation's."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    vocab = tokenizer.get_vocab()
    man = vocab[f"man{END_OF_WORD}"]
    for token in RARE_TOKENS:
        ids = tokenizer(f"{token} man").input_ids
        own = vocab.get(f"{token}{END_OF_WORD}")
        assert ids == [tokenizer.bos_token_id, own, man, tokenizer.eos_token_id], token
        assert encodes_as_one_token(token)


def test_the_checked_in_list_is_the_derivation() -> None:
    assert derive_rare_tokens() == RARE_TOKENS
    assert len(RARE_TOKENS) == len(set(RARE_TOKENS)) >= MIN_TOKENS


@pytest.mark.usefixtures("one_torch_thread")
def test_screen_runs_end_to_end_on_the_tiny_profile(tiny_model_dir: Path, tmp_path: Path) -> None:
    from core.ml.token_screen import main

    out = tmp_path / "screen.json"
    rc = main([
        "--profile", "tiny", "--model-path", str(tiny_model_dir), "--out", str(out),
        "--tokens", "pfw,gge", "--controls", "vfx", "--images", "2", "--steps", "1",
        "--clip-model", "ViT-B-32",
    ])  # fmt: skip
    assert rc == 0
    report = json.loads(out.read_text())
    assert [s["token"] for s in report["scores"]] == ["pfw", "gge", "vfx"]
    assert [s["control"] for s in report["scores"]] == [False, False, True]
    for score in report["scores"]:
        assert isinstance(score["alignment"], float) and isinstance(score["agreement"], float)
    assert report["judge"]["random"] is True and report["notes"]
