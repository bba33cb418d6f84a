"""Normalising what shop pages say: text, prices, currencies, availability, URLs.

Shops write the same fact many ways ("1.250,00 €", "1,250.00", 1250,
"https://schema.org/InStock", "in stock", "oos"); everything the extractors read
goes through here so a product compares equal however its page spelled it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable
from decimal import Decimal, InvalidOperation
from typing import Final
from urllib.parse import urldefrag, urljoin, urlsplit

_SPACE: Final = re.compile(r"\s+")
_TAG: Final = re.compile(r"</?[a-zA-Z][^>]*>")
# The first number in a string, with the separators shops put inside prices.
_NUMBER: Final = re.compile(r"\d(?:[\d.,'\u2019\s]*\d)?")  # apostrophes group thousands in CH
_CODE: Final = re.compile(r"\b([A-Z]{3})\b")
_CENT: Final = Decimal("0.01")
_SYMBOLS: Final = {"€": "EUR", "£": "GBP", "US$": "USD", "$": "USD", "¥": "JPY", "₩": "KRW"}
# schema.org ItemAvailability names and the OpenGraph / feed spellings, squashed
# to lower case without spaces, dashes or underscores.
_IN_STOCK: Final = frozenset(
    {"instock", "limitedavailability", "onlineonly", "instoreonly", "available",
     "availablefororder", "true", "yes"}
)  # fmt: skip
_OUT_OF_STOCK: Final = frozenset(
    {"outofstock", "soldout", "oos", "discontinued", "preorder", "presale", "backorder",
     "unavailable", "false", "no", "reserved"}
)  # fmt: skip


def clean_text(value: str) -> str:
    """Collapse whitespace; the empty string when nothing is left."""
    return _SPACE.sub(" ", value).strip()


def clean_markup_text(value: str) -> str:
    """Text from JSON: entities decoded, stray tags dropped (some shops put HTML
    in their JSON-LD descriptions), whitespace collapsed."""
    text = html.unescape(value)
    if "<" in text:
        text = _TAG.sub(" ", text)
    return clean_text(text)


def parse_price(value: object) -> Decimal | None:
    """A non-negative amount with two decimals, from a number or a price string.

    In a string the last of ',' and '.' is the decimal mark when both appear; a
    lone separator followed by exactly three digits groups thousands ("1.250").
    """
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float | Decimal):
        text = str(value)
    elif isinstance(value, str):
        match = _NUMBER.search(value)
        if match is None or value[: match.start()].rstrip().endswith("-"):
            return None  # no number, or a negative one
        text = _plain_number(match.group())
    else:
        return None
    try:
        amount = Decimal(text)
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0:
        return None
    return amount.quantize(_CENT)


def _plain_number(number: str) -> str:
    number = re.sub(r"[\s'\u2019]", "", number)
    if "," in number and "." in number:
        decimal_mark = "," if number.rfind(",") > number.rfind(".") else "."
        grouping = "." if decimal_mark == "," else ","
        return number.replace(grouping, "").replace(decimal_mark, ".")
    for mark in ",.":
        if mark in number:
            head, *rest = number.split(mark)
            if len(rest) > 1 or (len(rest[0]) == 3 and head != "0"):
                return number.replace(mark, "")
            return f"{head}.{rest[0]}"
    return number


def parse_currency(value: object) -> str | None:
    """An ISO 4217 code from a code ("eur") or a price string ("€ 1.250")."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    if re.fullmatch(r"[A-Za-z]{3}", text):
        return text.upper()
    code = _CODE.search(text)
    if code:
        return code.group(1)
    for symbol, iso in _SYMBOLS.items():
        if symbol in text:
            return iso
    return None


def parse_availability(value: object) -> bool | None:
    """True in stock, False not orderable now, None when the value says neither."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    token = re.sub(r"[\s_\-]", "", value.rsplit("/", 1)[-1].rsplit(":", 1)[-1]).lower()
    if token in _IN_STOCK:
        return True
    if token in _OUT_OF_STOCK:
        return False
    return None


# An absolute http(s) URL with a host and nothing urljoin would rewrite: no
# fragment, no dot segments, no empty query, no whitespace or backslashes.
_PLAIN_PATH = r"(?:/(?!\.\.?(?:/|\?|$))[^\s#?/\\]*)*(?:\?[^\s#\\]+)?"
_PLAIN_ORIGIN = r"https?://[A-Za-z0-9.\-]+(?::[0-9]+)?"
_PLAIN_ABSOLUTE: Final = re.compile(_PLAIN_ORIGIN + _PLAIN_PATH)
_PLAIN_ROOTED: Final = re.compile(r"(?!//)" + _PLAIN_PATH)  # "/p/x", not "//host/x"
_ORIGIN: Final = re.compile(_PLAIN_ORIGIN)


def absolute_url(page_url: str, link: str) -> str | None:
    """``link`` resolved against the page, without fragment; None unless http(s)."""
    link = link.strip()
    if _PLAIN_ABSOLUTE.fullmatch(link):
        return link  # what urljoin and urldefrag would make of it: itself
    if (
        link.startswith("/")
        and _PLAIN_ROOTED.fullmatch(link)
        and (origin := _ORIGIN.match(page_url))
    ):
        if page_url == origin.group() or page_url[origin.end()] in "/?#":
            return origin.group() + link
    if not link or link.startswith(("javascript:", "mailto:", "data:")):
        return None
    url = urldefrag(urljoin(page_url, link)).url
    return url if urlsplit(url).scheme in ("http", "https") else None


def absolute_urls(page_url: str, links: Iterable[str], limit: int | None = None) -> tuple[str, ...]:
    """Distinct absolute URLs in page order, at most ``limit``."""
    seen: dict[str, None] = {}
    for link in links:
        url = absolute_url(page_url, link)
        if url is not None:
            seen.setdefault(url)
            if limit is not None and len(seen) >= limit:
                break
    return tuple(seen)


def distinct_texts(values: Iterable[str]) -> tuple[str, ...]:
    """Cleaned, non-empty, first occurrence kept."""
    return tuple(dict.fromkeys(t for t in (clean_text(v) for v in values) if t))
