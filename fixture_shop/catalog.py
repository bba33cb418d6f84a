"""The catalog as a pure function of ``(seed, products, epoch)``.

Epoch 0 holds ``products`` products, ``P000000`` onwards. Each later epoch takes
the live products of the one before, in a seeded shuffle, and removes 1% of them
(half answer 404, half 410), sells out 3% of the available ones (sizes empty), and
changes the price of 5% of the rest; then it adds 2% new products (the next ids).
A product that an epoch does not touch is the same value, field for field, so its
pages are the same bytes (and ETag) in every epoch.

Product ``i`` is drawn from ``Random(f"{seed}:product:{i}")`` whatever the epoch
it appears in; epoch ``e``'s changes from ``Random(f"{seed}:epoch:{e}")``.
"""

from __future__ import annotations

import dataclasses
import random
from decimal import Decimal
from functools import lru_cache
from typing import Final, Literal

from fixture_shop.config import ShopConfig
from fixture_shop.fashion_data import (
    CATEGORIES,
    COLOURS,
    DESIGNERS,
    DETAIL_SENTENCES,
    DETAILS,
    MATERIALS,
    OPENINGS,
    ORIGIN_SENTENCES,
    STYLING_SENTENCES,
    CategorySpec,
    slugify,
)

ProductStatus = Literal["live", "gone404", "gone410"]

CURRENCY: Final = "EUR"
ADDED_FRACTION: Final = 0.02
REPRICED_FRACTION: Final = 0.05
SOLD_OUT_FRACTION: Final = 0.03
REMOVED_FRACTION: Final = 0.01
MIN_IMAGES: Final = 3
MAX_IMAGES: Final = 5
_CATEGORY_BY_PATH: Final[dict[tuple[str, ...], CategorySpec]] = {
    category.path: category for category in CATEGORIES
}
_CATEGORY_WEIGHTS: Final = [category.weight for category in CATEGORIES]
_COLOUR_NAMES: Final = tuple(COLOURS)


@dataclasses.dataclass(frozen=True, slots=True)
class ShopProduct:
    id: str  # "P000123"
    slug: str
    url_path: str  # "/p/<slug>-<id>"
    designer: str
    name: str
    description: str
    price: Decimal  # two places
    currency: str
    available: bool
    sizes_in_stock: tuple[str, ...]
    category_path: tuple[str, ...]  # ("Women", "Clothing", "Dresses")
    image_paths: tuple[str, ...]  # 3-5 "/images/<name>.jpg"
    status: ProductStatus
    # Beyond the brief's fields: what the images draw, and when the product
    # appeared and last changed (Last-Modified derives from them).
    colour: str
    created_epoch: int
    changed_epoch: int

    @property
    def category(self) -> CategorySpec:
        return _CATEGORY_BY_PATH[self.category_path]

    @property
    def all_sizes(self) -> tuple[str, ...]:
        """Every size the product comes in, in stock or not."""
        return self.category.sizes

    @property
    def designer_slug(self) -> str:
        return slugify(self.designer)

    @property
    def is_live(self) -> bool:
        return self.status == "live"


def product_id(index: int) -> str:
    return f"P{index:06d}"


def product_index(product_id_: str) -> int | None:
    """The index in ``P000123``, or None for anything that is not a product id."""
    digits = product_id_[1:]
    if len(product_id_) != 7 or product_id_[0] != "P" or not digits.isdigit():
        return None
    return int(digits)


def image_name(product_id_: str, view: int) -> str:
    """The stem of a product's ``view``-th image (1-based): ``p000123-2``."""
    return f"{product_id_.lower()}-{view}"


def _round_price(amount: float) -> Decimal:
    step = 10 if amount >= 200 else 5
    return Decimal(max(step, round(amount / step) * step)).quantize(Decimal("0.01"))


def _is_plural(noun: str) -> bool:
    """``sneakers``, ``trousers``, ``sunglasses`` (but not ``dress``)."""
    return noun.endswith("s") and not noun.endswith("ss")


def _description(rng: random.Random, designer: str, noun: str, colour: str, material: str,
                 family: str) -> str:  # fmt: skip
    this = "these" if _is_plural(noun) else "this"
    opening = rng.choice(OPENINGS).format(
        designer=designer,
        noun=noun,
        colour=colour.replace("-", " "),
        material=material,
        this=this,
        this_capital=this.capitalize(),
        verb="are" if _is_plural(noun) else "is",
    )
    extras = [rng.choice(DETAIL_SENTENCES[family])]
    if rng.random() < 0.6 and family in ("woven", "knit", "soft"):
        extras.append(rng.choice(STYLING_SENTENCES))
    if rng.random() < 0.5:
        extras.append(rng.choice(ORIGIN_SENTENCES))
    return " ".join([opening, *extras])


def _new_product(seed: int, index: int, epoch: int) -> ShopProduct:
    rng = random.Random(f"{seed}:product:{index}")
    category = rng.choices(CATEGORIES, weights=_CATEGORY_WEIGHTS)[0]
    designer = rng.choice(DESIGNERS)
    noun = rng.choice(category.nouns)
    material = rng.choice(MATERIALS[category.family])
    colour = rng.choice(_COLOUR_NAMES)
    words = [material, noun]
    if rng.random() < 0.75:
        words.insert(0, rng.choice(DETAILS[category.family]).lower())
    name = " ".join(words)
    name = name[0].upper() + name[1:]
    low, high = category.price_range
    price = _round_price(rng.uniform(low, high) * designer.price_tier)
    in_stock = tuple(size for size in category.sizes if rng.random() < 0.75)
    sizes_in_stock = in_stock or (rng.choice(category.sizes),)
    id_ = product_id(index)
    slug = slugify(f"{designer.name} {name}")
    views = rng.randint(MIN_IMAGES, MAX_IMAGES)
    return ShopProduct(
        id=id_,
        slug=slug,
        url_path=f"/p/{slug}-{id_}",
        designer=designer.name,
        name=name,
        description=_description(rng, designer.name, noun, colour, material, category.family),
        price=price,
        currency=CURRENCY,
        available=True,
        sizes_in_stock=sizes_in_stock,
        category_path=category.path,
        image_paths=tuple(f"/images/{image_name(id_, view)}.jpg" for view in range(1, views + 1)),
        status="live",
        colour=colour,
        created_epoch=epoch,
        changed_epoch=epoch,
    )


def _new_price(rng: random.Random, price: Decimal) -> Decimal:
    factor = rng.choice((0.7, 0.8, 0.85)) if rng.random() < 0.7 else rng.uniform(1.05, 1.15)
    changed = _round_price(float(price) * factor)
    return changed if changed != price else changed + Decimal(10)


def _evolve(previous: tuple[ShopProduct, ...], seed: int, epoch: int) -> tuple[ShopProduct, ...]:
    rng = random.Random(f"{seed}:epoch:{epoch}")
    live = [product for product in previous if product.is_live]
    shuffled = rng.sample(live, len(live))
    to_remove = round(REMOVED_FRACTION * len(live))
    to_sell_out = round(SOLD_OUT_FRACTION * len(live))
    to_reprice = round(REPRICED_FRACTION * len(live))
    changed: dict[str, ShopProduct] = {}
    for product in shuffled[:to_remove]:
        status: ProductStatus = "gone404" if rng.random() < 0.5 else "gone410"
        changed[product.id] = dataclasses.replace(product, status=status, changed_epoch=epoch)
    for product in shuffled[to_remove:]:
        if to_sell_out and product.available:
            changed[product.id] = dataclasses.replace(
                product, available=False, sizes_in_stock=(), changed_epoch=epoch
            )
            to_sell_out -= 1
        elif to_reprice:
            changed[product.id] = dataclasses.replace(
                product, price=_new_price(rng, product.price), changed_epoch=epoch
            )
            to_reprice -= 1
        else:
            break
    evolved = [changed.get(product.id, product) for product in previous]
    first_new = len(previous)
    to_add = round(ADDED_FRACTION * len(live))
    evolved.extend(
        _new_product(seed, index, epoch) for index in range(first_new, first_new + to_add)
    )
    return tuple(evolved)


@lru_cache(maxsize=256)
def _catalog(seed: int, products: int, epoch: int) -> tuple[ShopProduct, ...]:
    if epoch == 0:
        return tuple(_new_product(seed, index, 0) for index in range(products))
    return _evolve(_catalog(seed, products, epoch - 1), seed, epoch)


def catalog_at(config: ShopConfig, epoch: int) -> list[ShopProduct]:
    """Every product ever listed up to ``epoch`` (removed ones with their gone status)."""
    if epoch < 0:
        raise ValueError("epoch must be 0 or more")
    # Build up epoch by epoch so that a large epoch does not recurse deeply.
    for step in range(0, epoch, 16):
        _catalog(config.seed, config.products, step)
    return list(_catalog(config.seed, config.products, epoch))
