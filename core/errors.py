"""Typed domain errors.

Each error a user can cause has a stable ``code`` (it becomes the problem+json
``type``), a human ``detail`` and the HTTP-agnostic ``kind`` that the API maps to a
status code. core/ never imports HTTP; api/problems.py does the mapping.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorKind(StrEnum):
    invalid = "invalid"  # the request itself is wrong (422 / 400)
    too_large = "too_large"  # over a size limit (413)
    unsupported = "unsupported"  # a format we do not take (415)
    not_found = "not_found"  # unknown, or another account's (404)
    conflict = "conflict"  # valid request, wrong state (409)
    unauthorized = "unauthorized"  # missing or bad credentials (401)
    forbidden = "forbidden"  # good credentials, not allowed to do this (403)
    unavailable = "unavailable"  # a dependency is down (503)


class AtelierError(Exception):
    kind: ErrorKind = ErrorKind.invalid
    code: str = "invalid-request"
    title: str = "Invalid request"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInput(AtelierError):
    kind = ErrorKind.invalid
    code = "invalid-request"
    title = "Invalid request"


class PhotoRejected(AtelierError):
    """One uploaded photo cannot be used; ``extra`` names the photo."""

    kind = ErrorKind.invalid
    code = "photo-rejected"
    title = "Photo rejected"


class PhotoTooLarge(PhotoRejected):
    kind = ErrorKind.too_large
    code = "photo-too-large"
    title = "Photo too large"


class PhotoUnsupported(PhotoRejected):
    kind = ErrorKind.unsupported
    code = "photo-unsupported"
    title = "Unsupported photo format"


class NotFound(AtelierError):
    kind = ErrorKind.not_found
    code = "not-found"
    title = "Not found"


class Conflict(AtelierError):
    kind = ErrorKind.conflict
    code = "conflict"
    title = "Conflict"


class Unauthorized(AtelierError):
    kind = ErrorKind.unauthorized
    code = "unauthorized"
    title = "Unauthorized"


class Forbidden(AtelierError):
    kind = ErrorKind.forbidden
    code = "forbidden"
    title = "Forbidden"


class CheckpointMissing(AtelierError):
    """A model profile's weights are not on this host (never downloaded silently)."""

    kind = ErrorKind.unavailable
    code = "checkpoint-missing"
    title = "Model checkpoint missing"


class SearchImageRejected(AtelierError):
    """An image uploaded to product search cannot be read."""

    code = "search-image-rejected"
    title = "Search image rejected"


class SearchImageTooLarge(SearchImageRejected):
    kind = ErrorKind.too_large
    code = "search-image-too-large"
    title = "Search image too large"


class IndexNotReady(AtelierError):
    """No fashion-CLIP version is active yet: the catalog has not been embedded."""

    kind = ErrorKind.unavailable
    code = "index-not-ready"
    title = "Catalog index not ready"


class Canceled(Exception):
    """Raised inside a running job when it must stop at the next step."""


class OutOfDeviceMemory(AtelierError):
    """A job needed more GPU memory than its device had: the job is placed again on
    a larger GPU (once), never retried on the same one."""

    kind = ErrorKind.unavailable
    code = "out-of-device-memory"
    title = "Out of GPU memory"
