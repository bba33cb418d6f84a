"""The class prompt's article follows the sound of the noun a user gives, not its
first letter ("a university student", "an hour", never "an university")."""

from __future__ import annotations

import pytest

from core.ml.class_images import class_prompt, indefinite_article


@pytest.mark.parametrize(
    ("noun", "article"),
    [
        ("university student", "a"),
        ("uniform wearer", "a"),
        ("european man", "a"),
        ("one legged man", "a"),
        ("one-armed woman", "a"),
        ("user", "a"),
        ("usual suspect", "a"),
        ("ukulele player", "a"),
        ("honest man", "an"),
        ("hour", "an"),
        ("heir", "an"),
        ("uninvited guest", "an"),
        ("unidentified man", "an"),
        ("umpire", "an"),
        ("old man", "an"),
        ("elderly woman", "an"),
        ("onerous boss", "an"),
        ("woman", "a"),
        ("hiker", "a"),
    ],
)
def test_article_follows_the_sound(noun: str, article: str) -> None:
    assert indefinite_article(noun) == article
    assert class_prompt(noun) == f"a photo of {article} {noun}"
