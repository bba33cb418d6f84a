"""When a webhook delivery is tried again, and what an attempt's answer means.

The Standard Webhooks schedule: immediately, then 5 s, 5 min, 30 min, 2 h, 5 h,
10 h, 14 h, 20 h and 24 h after the previous failure, each with jitter so that an
endpoint that comes back is not hit by every pending event at one instant. A 2xx
is success; a redirect is a failure (none is followed: a redirect could point
inside the network the SSRF guard protects); 410 Gone disables the endpoint; 429,
502, 503 and 504 are retried no sooner than their Retry-After asks (within the
schedule's longest wait); anything else, a timeout or a refused connection is
retried on the schedule, and the last failure ends the event.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

# Seconds to wait before each attempt after the first (which is immediate).
RETRY_DELAYS_S = (5, 5 * 60, 30 * 60, 2 * 3600, 5 * 3600, 10 * 3600, 14 * 3600,
                  20 * 3600, 24 * 3600)  # fmt: skip
ATTEMPTS = 1 + len(RETRY_DELAYS_S)
# Each delay is stretched or shrunk by up to this share.
JITTER = 0.1
# Answers that name when to come back.
_HONOUR_RETRY_AFTER = frozenset({429, 502, 503, 504})
_GONE = 410


class Outcome(StrEnum):
    delivered = "delivered"
    retry = "retry"  # try again after ``delay_s``
    failed = "failed"  # attempts exhausted: the event is not delivered
    disable = "disable"  # the endpoint said it is gone (410)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    delay_s: float | None = None


def _retry_after(header: str | None) -> float | None:
    """Retry-After in seconds (an HTTP date is not honoured: the schedule applies)."""
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def judge(
    attempt: int,
    status: int | None,
    retry_after: str | None = None,
    *,
    rng: random.Random | None = None,
) -> Verdict:
    """What attempt ``attempt`` (1-based) answering ``status`` (None: no answer:
    timeout, refused, reset) means for the event."""
    if status is not None and 200 <= status < 300:
        return Verdict(Outcome.delivered)
    if status == _GONE:
        return Verdict(Outcome.disable)
    if attempt >= ATTEMPTS:
        return Verdict(Outcome.failed)
    base = RETRY_DELAYS_S[attempt - 1]
    delay = base * (1 + (rng or random).uniform(-JITTER, JITTER))
    asked = _retry_after(retry_after) if status in _HONOUR_RETRY_AFTER else None
    if asked is not None:
        delay = min(max(delay, asked), RETRY_DELAYS_S[-1])
    return Verdict(Outcome.retry, round(delay, 3))
