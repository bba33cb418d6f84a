"""What the crawler reads off one product page, before it touches the database."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from decimal import Decimal
from enum import StrEnum


class ChangeKind(StrEnum):
    new = "new"
    changed = "changed"
    unchanged = "unchanged"
    gone = "gone"


@dataclass(frozen=True)
class ProductRecord:
    """One product as a site entry extracted it. Missing text fields are empty."""

    external_id: str  # the shop's SKU; with the site, the product's identity
    url: str
    designer: str = ""
    name: str = ""
    description: str = ""
    price: Decimal | None = None
    currency: str | None = None  # ISO 4217
    available: bool = True
    sizes: tuple[str, ...] = ()  # sizes in stock
    category_path: tuple[str, ...] = ()
    image_urls: tuple[str, ...] = field(default=())  # absolute, in page order

    def content_hash(self) -> str:
        """sha256 of every field a shopper sees: a new hash is a changed product."""
        # Every field is a str, a bool, a Decimal or a tuple of str: a shallow dict
        # serialises as asdict() would, without its deep copy (a cost on every
        # page). The hash is stored: its bytes must never change.
        fields = {f.name: getattr(self, f.name) for f in dataclass_fields(self)}
        fields["price"] = None if self.price is None else f"{self.price:.2f}"
        canonical = json.dumps(fields, sort_keys=True, ensure_ascii=False, default=list)
        return hashlib.sha256(canonical.encode()).hexdigest()
