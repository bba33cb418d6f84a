"""``AtelierClient``: every route a frontend, a test or the demo needs, typed."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from api.catalog_schemas import ProductPageOut
from api.look_schemas import LookOut, LookPage
from api.schemas import JobOut, JobPage, SubjectOut
from api.shop_schemas import OutputProductsOut
from client.errors import AtelierAPIError

M = TypeVar("M", bound=BaseModel)

# Statuses worth retrying: the API or a dependency is briefly unavailable, a limit
# was hit, or the same Idempotency-Key is still in flight. Each names Retry-After.
_RETRY_STATUSES = frozenset({409, 429, 502, 503, 504})
_FINISHED = frozenset({"succeeded", "failed", "canceled"})
# The server caps one long-poll at 60 s; a client waits longer by asking again.
_LONG_POLL_S = 30.0


@dataclass(frozen=True)
class LookEvent:
    """One Server-Sent Event of ``GET /v1/looks/{id}/events``."""

    id: int
    name: str  # progress, stage, image, completed, failed, canceled
    data: dict[str, Any]


class AtelierClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 90.0,
        retries: int = 3,
        max_retry_after_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"}
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.retries = retries
        self.max_retry_after_s = max_retry_after_s

    async def __aenter__(self) -> AtelierClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # --- plumbing ---------------------------------------------------------------

    def _delay(self, response: httpx.Response | None, attempt: int) -> float:
        header = response.headers.get("retry-after") if response is not None else None
        try:
            wanted = float(header) if header else 0.5 * 2**attempt
        except ValueError:
            wanted = 0.5 * 2**attempt
        return min(wanted, self.max_retry_after_s)

    async def request(
        self, method: str, path: str, *, idempotent: bool | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One call, retried while it is safe: GETs, and POSTs made idempotent by
        the key set here (the same key on each try, so the server runs it once)."""
        if method == "POST" and idempotent is not False:
            headers = kwargs.pop("headers", None) or {}
            headers.setdefault("Idempotency-Key", str(uuid.uuid4()))
            kwargs["headers"] = headers
            idempotent = True
        retry = idempotent or method in ("GET", "HEAD", "DELETE")
        for attempt in range(self.retries + 1):
            last = attempt == self.retries or not retry
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if last:
                    raise
                await asyncio.sleep(self._delay(None, attempt))
                continue
            if response.status_code in _RETRY_STATUSES and not last:
                if response.status_code != 409 or "idempotency" in response.text:
                    await asyncio.sleep(self._delay(response, attempt))
                    continue
            if response.status_code >= 400 and response.status_code != 304:
                raise AtelierAPIError.of(response)
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _model(self, model: type[M], method: str, path: str, **kwargs: Any) -> M:
        return model.model_validate_json((await self.request(method, path, **kwargs)).content)

    # --- subjects -------------------------------------------------------------------

    async def create_subject(
        self, photos: Sequence[tuple[str, bytes]], *, class_noun: str = "person", name: str = ""
    ) -> SubjectOut:
        """``photos``: (file name, JPEG/PNG/WebP bytes), 3-8 of one person."""
        files = [("photos", (n, data, "application/octet-stream")) for n, data in photos]
        data = {"class_noun": class_noun, "name": name}
        return await self._model(SubjectOut, "POST", "/v1/subjects", files=files, data=data)

    async def subject(self, subject_id: uuid.UUID | str) -> SubjectOut:
        return await self._model(SubjectOut, "GET", f"/v1/subjects/{subject_id}")

    async def delete_subject(self, subject_id: uuid.UUID | str) -> None:
        await self.request("DELETE", f"/v1/subjects/{subject_id}")

    async def train(self, subject_id: uuid.UUID | str, **spec: Any) -> JobOut:
        """``spec``: steps, with_subjects, profile (the route's body)."""
        return await self._model(JobOut, "POST", f"/v1/subjects/{subject_id}/train", json=spec)

    # --- looks ----------------------------------------------------------------------

    async def create_look(self, subject_id: uuid.UUID | str, prompt: str, **spec: Any) -> LookOut:
        """``spec``: the rest of the look's spec (num_images, candidates, filters,
        seed...)."""
        body = {"subject_id": str(subject_id), "prompt": prompt, **spec}
        return await self._model(LookOut, "POST", "/v1/looks", json=body)

    async def look(self, look_id: uuid.UUID | str) -> LookOut:
        return await self._model(LookOut, "GET", f"/v1/looks/{look_id}")

    async def looks(self, **filters: Any) -> LookPage:
        """``filters``: status, subject_id, limit, cursor."""
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return await self._model(LookPage, "GET", "/v1/looks", params=params)

    async def cancel_look(self, look_id: uuid.UUID | str) -> LookOut:
        return await self._model(LookOut, "POST", f"/v1/looks/{look_id}/cancel", idempotent=True)

    async def wait_for_look(self, look_id: uuid.UUID | str, *, within: float = 600) -> LookOut:
        """The look once finished, by long-polls (no busy polling)."""
        data = await self._wait_finished(f"/v1/looks/{look_id}", within)
        return LookOut.model_validate(data)

    async def look_events(self, look_id: uuid.UUID | str) -> AsyncIterator[LookEvent]:
        """The look's events until it finishes (the stream then ends)."""
        async with self._http.stream("GET", f"/v1/looks/{look_id}/events") as response:
            if response.status_code >= 400:
                await response.aread()
                raise AtelierAPIError.of(response)
            fields: dict[str, str] = {}
            async for line in response.aiter_lines():
                if line.startswith(":"):
                    continue
                if line:
                    name, _, value = line.partition(": ")
                    fields[name] = value
                    continue
                if "event" in fields:
                    yield LookEvent(int(fields.get("id", 0)), fields["event"],
                                    json.loads(fields.get("data", "{}")))  # fmt: skip
                fields = {}

    # --- jobs, generations ------------------------------------------------------------

    async def generate(self, subject_id: uuid.UUID | str, prompt: str, **spec: Any) -> JobOut:
        body = {"subject_id": str(subject_id), "prompt": prompt, **spec}
        return await self._model(JobOut, "POST", "/v1/generations", json=body)

    async def job(self, job_id: uuid.UUID | str) -> JobOut:
        return await self._model(JobOut, "GET", f"/v1/jobs/{job_id}")

    async def jobs(self, **filters: Any) -> JobPage:
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return await self._model(JobPage, "GET", "/v1/jobs", params=params)

    async def cancel_job(self, job_id: uuid.UUID | str) -> JobOut:
        return await self._model(JobOut, "POST", f"/v1/jobs/{job_id}/cancel", idempotent=True)

    async def wait_for_job(self, job_id: uuid.UUID | str, *, within: float = 600) -> JobOut:
        """The job once finished, by long-polls."""
        return JobOut.model_validate(await self._wait_finished(f"/v1/jobs/{job_id}", within))

    async def watch_job(
        self, job_id: uuid.UUID | str, *, within: float = 600
    ) -> AsyncIterator[JobOut]:
        """Each new state of the job until it finishes, by long-polls."""
        async for data in self._changes(f"/v1/jobs/{job_id}", within):
            yield JobOut.model_validate(data)

    async def _changes(self, path: str, within: float) -> AsyncIterator[dict[str, Any]]:
        deadline = time.monotonic() + within
        etag = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{path} did not finish within {within} s")
            headers: dict[str, str] = {"If-None-Match": etag} if etag else {}
            params: dict[str, str] = {"wait": f"{min(left, _LONG_POLL_S):.1f}"} if etag else {}
            response = await self.request("GET", path, headers=headers, params=params)
            if response.status_code == 304:
                continue
            etag = response.headers.get("etag")
            data = dict(response.json())
            yield data
            if data["status"] in _FINISHED:
                return

    async def _wait_finished(self, path: str, within: float) -> dict[str, Any]:
        states = [state async for state in self._changes(path, within)]
        return states[-1]

    # --- outputs and products -----------------------------------------------------------

    async def download(self, url: str) -> bytes:
        """An output's or a catalog image's bytes (an absolute URL the API gave)."""
        return (await self.request("GET", url)).content

    async def output_products(self, output_id: uuid.UUID | str) -> OutputProductsOut:
        return await self._model(OutputProductsOut, "GET", f"/v1/outputs/{output_id}/products")

    async def products(self, **filters: Any) -> ProductPageOut:
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return await self._model(ProductPageOut, "GET", "/v1/products", params=params)

    # --- operators ------------------------------------------------------------------------

    async def start_crawl(self, site: str) -> JobOut:
        """A crawl of ``site`` (admin key); AtelierAPIError 409 names the active one."""
        return await self._model(JobOut, "POST", "/v1/admin/crawls", json={"site": site})
