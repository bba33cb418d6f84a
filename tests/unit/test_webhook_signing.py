"""Standard Webhooks signatures, checked against the spec's reference library
(`standardwebhooks` from PyPI) both ways."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from core.webhooks.signing import InvalidWebhook, new_secret, sign, verify

BODY = b'{"type":"look.completed","data":{"id":"c0a8012e"}}'


def test_the_reference_library_verifies_a_delivery_signed_here() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    now = int(time.time())
    headers = sign([secret], "evt_1", now, BODY).as_dict()
    assert Webhook(secret).verify(BODY, headers) == {"type": "look.completed",
                                                      "data": {"id": "c0a8012e"}}  # fmt: skip


def test_a_delivery_signed_by_the_reference_library_verifies_here() -> None:
    secret = new_secret()
    now = int(time.time())
    stamp = datetime.fromtimestamp(now, UTC)
    headers = {"webhook-id": "evt_2", "webhook-timestamp": str(now),
               "webhook-signature": Webhook(secret).sign("evt_2", stamp, BODY)}  # fmt: skip
    assert verify(secret, headers, BODY, now=now) == "evt_2"


def test_during_a_rotation_either_secret_verifies() -> None:
    old, new = new_secret(), new_secret()
    now = int(time.time())
    headers = sign([old, new], "evt_3", now, BODY).as_dict()
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(BODY, headers)
        assert verify(secret, headers, BODY, now=now) == "evt_3"
    with pytest.raises(WebhookVerificationError):
        Webhook(new_secret()).verify(BODY, headers)


def test_a_changed_body_a_stale_timestamp_or_a_missing_header_is_refused() -> None:
    secret = new_secret()
    now = int(time.time())
    headers = sign([secret], "evt_4", now, BODY).as_dict()
    with pytest.raises(InvalidWebhook, match="no signature"):
        verify(secret, headers, BODY + b" ", now=now)
    with pytest.raises(InvalidWebhook, match="too far"):
        verify(secret, headers, BODY, now=now + 301)
    with pytest.raises(InvalidWebhook, match="missing"):
        verify(secret, {k: v for k, v in headers.items() if k != "webhook-id"}, BODY, now=now)
