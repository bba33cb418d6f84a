"""The rare tokens DreamBooth binds subjects to, and the filter that picks them.

DreamBooth (Ruiz et al. 2022, section 4.1) names a subject with a token the text
encoder has a weak prior for: a common word, or an acronym, brings its meaning
along and the model entangles it with the person. A token is chosen when it is

* three lowercase ASCII letters (the paper's identifiers are 1-3 letters; the
  two-letter ones are too few and too common);
* one whole-word token of CLIP's BPE vocabulary, so ``"<token> man"`` encodes it
  as one id (the tokenizers of SD 1.x and of both SDXL encoders share it);
* made by one of CLIP's late merges (rank above ``RARE_MERGE_RANK``): a pair that
  was rare in the text the BPE table was learned from;
* rare in ordinary text: a wordfreq Zipf frequency below ``MAX_ZIPF`` in every
  Latin-script language wordfreq covers. The merge rank alone let in acronyms
  with strong priors (vfx 2.75, lds 3.22, gsm 3.15, pnw 2.39 in English);
* not rejected by a screen of the base model (``SCREEN_REJECTED``): word counts
  miss what the image model learned from captions, which
  ``python -m core.ml.token_screen`` measures on a real host.

The list is checked-in data: the web process imports it through core.subjects
and must neither load wordfreq's lists (tens of MB, seconds) nor torch.
``python -m core.rare_tokens`` derives it again and prints it; ``--check`` exits
1 when the checked-in list differs (the unit tests compare the same way).
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.shop.clip_tokenizer import ClipTokenizer

TOKEN_LETTERS = 3
# The old list's bar: merges above it are the last ~18,900 of CLIP's 48,894.
RARE_MERGE_RANK = 30_000
# wordfreq's Zipf scale is log10 of uses per billion words: below 2.0 is fewer
# than one use in ten million words. The 12 acronyms the old list held score
# 2.37 (rnb) to 3.22 (lds) in English.
MAX_ZIPF = 2.0
# wordfreq's languages written in the Latin alphabet (its "best" lists), where
# three ASCII letters can spell a word or an acronym.
LATIN_SCRIPT_LANGUAGES = (
    "ca", "cs", "da", "de", "en", "es", "fi", "fil", "fr", "hu", "id", "is", "it", "lt",
    "lv", "ms", "nb", "nl", "pl", "pt", "ro", "sh", "sk", "sl", "sv", "tr", "vi",
)  # fmt: skip
# Tokens a base-model screen (core.ml.token_screen) flagged as drawing something in
# particular; none yet: no real-host screen has been run.
SCREEN_REJECTED: frozenset[str] = frozenset()

# Derived by `python -m core.rare_tokens` (CLIP's bpe_simple_vocab_16e6.txt.gz as
# open_clip ships it, wordfreq 3.1); by merge rank.
RARE_TOKENS = (
    "pfw", "gge", "ify", "uko", "xox", "yxe", "jhb", "iah", "wwg", "bnw", "uku", "yqr",
    "ymm", "nli", "rew", "snz", "zyk", "nhm", "yev", "aay", "gby", "knw", "cki", "ifu",
    "mbu", "nhq", "hyd", "gya", "raq", "msy", "xpo", "ygk", "laq", "slv", "tmw", "yql",
    "lyk", "smx", "chk", "wwx", "omf", "vaw", "szn", "eha",
)  # fmt: skip


def _is_identifier_shaped(word: str) -> bool:
    return len(word) == TOKEN_LETTERS and word.isascii() and word.isalpha() and word.islower()


def max_zipf(word: str) -> float:
    """The word's highest wordfreq Zipf frequency among the Latin-script languages."""
    from wordfreq import zipf_frequency

    return max(zipf_frequency(word, language) for language in LATIN_SCRIPT_LANGUAGES)


def is_rare_in_text(word: str) -> bool:
    """Not a word or an acronym anyone writes often, in any Latin-script language."""
    return max_zipf(word) < MAX_ZIPF


@functools.cache
def _clip_tokenizer() -> ClipTokenizer:
    """CLIP's BPE tokenizer over the table open_clip ships, without torch."""
    from core.shop.clip_tokenizer import ClipTokenizer, bundled_vocab_path

    return ClipTokenizer(bundled_vocab_path())


def whole_word_merge_ranks() -> dict[str, int]:
    """Every whole-word token of CLIP's vocabulary ("<text></w>", made by a merge)
    by its text, with the rank of that merge: 0 for the first merge learned (the
    commonest pair), higher for rarer ones."""
    from core.shop.clip_tokenizer import END_OF_WORD

    return {
        "".join(pair).removesuffix(END_OF_WORD): rank
        for pair, rank in _clip_tokenizer().bpe_ranks.items()
        if pair[1].endswith(END_OF_WORD)
    }


def encodes_as_one_token(word: str) -> bool:
    """``"<word> man"`` is the word's own token then man's, as a caption has it."""
    from core.shop.clip_tokenizer import END_OF_WORD

    tokenizer = _clip_tokenizer()
    own = tokenizer.encoder.get(word + END_OF_WORD)
    return own is not None and tokenizer.encode(f"{word} man")[:-1] == [own]


def derive_rare_tokens(rejected: Iterable[str] = SCREEN_REJECTED) -> tuple[str, ...]:
    """The tokens that pass every test of the module docstring, by merge rank."""
    screened_out = set(rejected)
    ranks = whole_word_merge_ranks()
    chosen = [
        word
        for word, rank in sorted(ranks.items(), key=lambda item: item[1])
        if rank > RARE_MERGE_RANK
        and _is_identifier_shaped(word)
        and word not in screened_out
        and is_rare_in_text(word)
        and encodes_as_one_token(word)
    ]
    return tuple(chosen)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m core.rare_tokens",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when the checked-in RARE_TOKENS differ from the derivation",
    )
    args = parser.parse_args(argv)
    derived = derive_rare_tokens()
    if args.check:
        if derived != RARE_TOKENS:
            print(f"RARE_TOKENS is stale: derived {derived}", file=sys.stderr)
            return 1
        print(f"RARE_TOKENS matches the derivation ({len(derived)} tokens)")
        return 0
    ranks = whole_word_merge_ranks()
    for word in derived:
        print(f"{word}\tmerge rank {ranks[word]}\tzipf {max_zipf(word):.2f}")
    print(f"{len(derived)} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
