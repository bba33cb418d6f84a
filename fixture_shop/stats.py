"""What the shop has been asked: the numbers a benchmark or a test reads back."""

from __future__ import annotations

from collections import Counter
from typing import Any, Final

REQUEST_KINDS: Final = (
    "robots", "home", "listing", "sitemap", "product", "image", "private", "admin", "other",
)  # fmt: skip
# Recorded when the client went away before the answer was ready.
CLIENT_CLOSED: Final = 499
_PREFIX_KINDS: Final = (
    ("/p/", "product"),
    ("/images/", "image"),
    ("/c/", "listing"),
    ("/d/", "listing"),
    ("/sitemaps/", "sitemap"),
    ("/private/", "private"),
    ("/_admin/", "admin"),
)
_EXACT_KINDS: Final = {"/": "home", "/robots.txt": "robots", "/sitemap.xml": "sitemap"}


def kind_of_path(path: str) -> str:
    """Which of ``REQUEST_KINDS`` a request for ``path`` counts as."""
    exact = _EXACT_KINDS.get(path)
    if exact is not None:
        return exact
    for prefix, kind in _PREFIX_KINDS:
        if path.startswith(prefix):
            return kind
    return "other"


class ShopStats:
    """Counts by kind and status; in-flight counts leave ``/_admin/`` requests out."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.by_kind_status: Counter[tuple[str, int]] = Counter()
        self.peak_in_flight = 0

    def reset(self) -> None:
        self.by_kind_status.clear()
        self.peak_in_flight = self.in_flight

    def started(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def finished(self, kind: str, status: int, *, was_in_flight: bool) -> None:
        if was_in_flight:
            self.in_flight -= 1
        self.by_kind_status[(kind, status)] += 1

    def snapshot(self) -> dict[str, Any]:
        by_kind: Counter[str] = Counter()
        by_status: Counter[int] = Counter()
        by_kind_status: dict[str, dict[str, int]] = {}
        for (kind, status), count in sorted(self.by_kind_status.items()):
            by_kind[kind] += count
            by_status[status] += count
            by_kind_status.setdefault(kind, {})[str(status)] = count
        return {
            "total": sum(by_kind.values()),
            "by_kind": {kind: by_kind.get(kind, 0) for kind in REQUEST_KINDS},
            "by_status": {str(status): count for status, count in sorted(by_status.items())},
            "by_kind_status": by_kind_status,
            "not_modified": by_status.get(304, 0),
            "private": by_kind.get("private", 0),
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
        }
