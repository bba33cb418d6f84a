"""The error a client call raises when the API answers with a problem."""

from __future__ import annotations

from typing import Any

import httpx


class AtelierAPIError(Exception):
    """A non-2xx answer: its status and RFC 9457 problem (``type``, ``title``,
    ``detail`` and any extension members)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(f"{status} {problem.get('type', '')}: {problem.get('detail', '')}")

    @property
    def type(self) -> str:
        return str(self.problem.get("type", "about:blank"))

    @property
    def detail(self) -> str:
        return str(self.problem.get("detail", ""))

    @classmethod
    def of(cls, response: httpx.Response) -> AtelierAPIError:
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:500]}
        problem = body if isinstance(body, dict) else {"detail": str(body)}
        return cls(response.status_code, problem)
