"""Response bodies under a byte budget, on the wire and after decompression.

A shop (or anything pretending to be one) can send a body of any size, or a
small gzip stream that inflates to gigabytes. The crawler reads bodies chunk by
chunk through a CappedDecoder, which stops as soon as either budget is spent,
before the bytes are in memory. Sitemaps served as ``.xml.gz`` files are gzip
*files* (whatever Content-Encoding said) and go through the same decoder.
"""

from __future__ import annotations

import zlib
from typing import Final

GZIP_MAGIC: Final = b"\x1f\x8b"


class BodyTooLarge(Exception):
    """Over the byte budget (the wire size, the declared length or the inflated size)."""


class BodyCorrupt(Exception):
    """A compressed body that does not decompress, or an encoding we do not speak."""


class CappedDecoder:
    """Decodes a Content-Encoding (identity, gzip, deflate) chunk by chunk and
    refuses to produce more than ``limit`` bytes."""

    def __init__(self, encoding: str | None, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._encoding = (encoding or "identity").strip().lower()
        self._started = False
        if self._encoding in ("identity", ""):
            self._inflater = None
        elif self._encoding in ("gzip", "x-gzip"):
            self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        elif self._encoding == "deflate":
            self._inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS)
        else:
            raise BodyCorrupt(f"unsupported content encoding {encoding!r}")

    def feed(self, data: bytes) -> bytes:
        if self._inflater is None:
            return self._count(data)
        try:
            out = self._inflater.decompress(data, self.limit - self.size + 1)
        except zlib.error as exc:
            if self._encoding == "deflate" and not self._started:
                # "deflate" servers often send raw deflate without the zlib header.
                self._inflater = zlib.decompressobj(wbits=-zlib.MAX_WBITS)
                self._started = True
                return self.feed(data)
            raise BodyCorrupt(f"{self._encoding} body does not decompress: {exc}") from exc
        self._started = True
        return self._count(out)

    def flush(self) -> bytes:
        if self._inflater is None:
            return b""
        try:
            return self._count(self._inflater.flush())
        except zlib.error as exc:
            raise BodyCorrupt(f"{self._encoding} body is truncated: {exc}") from exc

    def _count(self, out: bytes) -> bytes:
        self.size += len(out)
        if self.size > self.limit:
            raise BodyTooLarge(f"more than {self.limit:,} bytes once decoded")
        return out


def decode_all(data: bytes, encoding: str | None, limit: int) -> bytes:
    decoder = CappedDecoder(encoding, limit)
    return decoder.feed(data) + decoder.flush()


def gunzip_file(data: bytes, limit: int) -> bytes:
    """The content of a gzip file (a ``.xml.gz`` sitemap); other bytes unchanged."""
    return decode_all(data, "gzip", limit) if data.startswith(GZIP_MAGIC) else data
