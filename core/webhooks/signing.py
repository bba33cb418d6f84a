"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

A delivery carries ``webhook-id`` (the event's id, the same on every attempt, for
consumers' dedupe), ``webhook-timestamp`` (Unix seconds of this attempt) and
``webhook-signature``: space-separated ``v1,<base64 HMAC-SHA256>`` of
``"{id}.{timestamp}.{body}"``, one per secret. During a rotation the endpoint has
two secrets and a delivery is signed with both, so a consumer holding either one
verifies it. Secrets are ``whsec_`` + base64 of 24 random bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 24  # 192 bits, as the spec's reference libraries generate
SIGNATURE_VERSION = "v1"
# A consumer refuses a delivery whose timestamp is further than this from its
# clock: a replayed capture is stale, a skewed clock is not.
TOLERANCE_S = 5 * 60


class InvalidWebhook(Exception):
    """Headers missing, a timestamp out of tolerance, or no signature matches."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def _key(secret: str) -> bytes:
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
    except ValueError as exc:
        raise ValueError("a webhook secret is 'whsec_' + base64") from exc
    if not key:
        raise ValueError("a webhook secret may not be empty")
    return key


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class SignedHeaders:
    message_id: str
    timestamp: int
    signatures: str

    def as_dict(self) -> dict[str, str]:
        return {
            "webhook-id": self.message_id,
            "webhook-timestamp": str(self.timestamp),
            "webhook-signature": self.signatures,
        }


def sign(secrets_: Sequence[str], message_id: str, timestamp: int, body: bytes) -> SignedHeaders:
    """The headers of one delivery attempt, signed with every current secret."""
    if not secrets_:
        raise ValueError("an endpoint has at least one secret")
    joined = " ".join(signature(s, message_id, timestamp, body) for s in secrets_)
    return SignedHeaders(message_id, timestamp, joined)


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, now: float) -> str:
    """For consumers: the event id if ``body`` and ``headers`` were signed with
    ``secret`` within the tolerance of ``now``; InvalidWebhook otherwise."""
    lowered = {k.lower(): v for k, v in headers.items()}
    message_id = lowered.get("webhook-id")
    stamp = lowered.get("webhook-timestamp")
    given = lowered.get("webhook-signature")
    if not (message_id and stamp and given):
        raise InvalidWebhook("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError as exc:
        raise InvalidWebhook("webhook-timestamp is not Unix seconds") from exc
    if abs(now - timestamp) > TOLERANCE_S:
        raise InvalidWebhook("webhook-timestamp is too far from now (replayed, or a skewed clock)")
    expected = signature(secret, message_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, s.encode()) for s in given.split(" ")):
        raise InvalidWebhook("no signature matches this secret")
    return message_id
