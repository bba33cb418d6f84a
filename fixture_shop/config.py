"""The shop's knobs: one frozen value, shared by the app, the CLI and the tests."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ShopConfig:
    """What a fixture shop serves.

    The catalog is a pure function of ``(seed, products, epoch)``; ``trouble``
    switches the deterministic misbehaviour on (see ``fixture_shop.troubles``);
    ``latency_ms`` is how long after its request every response but the
    ``/_admin/*`` ones leaves.
    """

    seed: int = 7
    products: int = 2000
    latency_ms: float = 0.0
    trouble: bool = True
    epoch: int = 0
    image_side: int = 320
    page_size: int = 48

    def __post_init__(self) -> None:
        if self.products < 1:
            raise ValueError("products must be at least 1")
        if self.epoch < 0:
            raise ValueError("epoch must be 0 or more")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be 0 or more")
        if self.image_side < 32:
            raise ValueError("image_side must be at least 32")
        if self.page_size < 1:
            raise ValueError("page_size must be at least 1")
