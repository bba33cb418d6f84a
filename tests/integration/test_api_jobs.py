"""Jobs over HTTP: creation, dependencies, listing, cancel, validation."""

from __future__ import annotations

import uuid

from httpx import AsyncClient

from tests.conftest import photo_files


async def _subject(client: AsyncClient, auth: dict[str, str], photos: list) -> str:
    response = await client.post("/v1/subjects", headers=auth, files=photo_files(photos))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def test_generation_without_lora_waits_for_a_training_job(
    client: AsyncClient, auth: dict[str, str], sample_photos: list
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    response = await client.post(
        "/v1/generations",
        headers=auth,
        json={"subject_id": subject_id, "prompt": "a wizard robe", "seed": 7},
    )
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "generate" and job["status"] == "queued"
    assert job["params"]["seed"] == 7 and job["params"]["num_images"] == 4
    training = (await client.get(f"/v1/jobs/{job['depends_on']}", headers=auth)).json()
    assert training["kind"] == "train" and training["subject_id"] == subject_id

    # A second generation reuses the same pending training job.
    again = await client.post(
        "/v1/generations", headers=auth, json={"subject_id": subject_id, "prompt": "a cape"}
    )
    assert again.json()["depends_on"] == job["depends_on"]


async def test_list_jobs_paginates_with_a_cursor(
    client: AsyncClient, auth: dict[str, str], other_auth: dict[str, str], sample_photos: list
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    created = []
    for _ in range(5):
        r = await client.post(f"/v1/subjects/{subject_id}/train", headers=auth, json={"steps": 2})
        created.append(r.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await client.get("/v1/jobs", headers=auth, params=params)).json()
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == list(reversed(created))
    theirs = (await client.get("/v1/jobs", headers=other_auth)).json()
    assert theirs["items"] == []
    bad = await client.get("/v1/jobs", headers=auth, params={"cursor": "garbage!"})
    assert bad.status_code == 422


async def test_cancel_queued_then_cancel_again_is_409(
    client: AsyncClient, auth: dict[str, str], sample_photos: list
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    job = (await client.post(f"/v1/subjects/{subject_id}/train", headers=auth)).json()
    canceled = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert canceled.status_code == 200
    assert canceled.json()["status"] == "canceled"
    again = await client.post(f"/v1/jobs/{job['id']}/cancel", headers=auth)
    assert again.status_code == 409
    assert again.json()["status"] == 409 and "canceled" in again.json()["detail"]


async def test_unknown_job_is_404(client: AsyncClient, auth: dict[str, str]) -> None:
    for path in (f"/v1/jobs/{uuid.uuid4()}", f"/v1/outputs/{uuid.uuid4()}"):
        response = await client.get(path, headers=auth)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
    cancel = await client.post(f"/v1/jobs/{uuid.uuid4()}/cancel", headers=auth)
    assert cancel.status_code == 404


async def test_generation_validation(
    client: AsyncClient, auth: dict[str, str], sample_photos: list
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    cases = [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 501}, "prompt"),
        ({"prompt": "a hat", "num_images": 0}, "num_images"),
        ({"prompt": "a hat", "num_images": 9}, "num_images"),
        ({"prompt": "a hat", "seed": -1}, "seed"),
        ({"prompt": "a hat", "steps": 0}, "steps"),
    ]
    for extra, field in cases:
        response = await client.post(
            "/v1/generations", headers=auth, json={"subject_id": subject_id, **extra}
        )
        assert response.status_code == 422, (extra, response.text)
        assert field in response.text, (extra, response.text)
    unknown = await client.post(
        "/v1/generations", headers=auth, json={"subject_id": str(uuid.uuid4()), "prompt": "a hat"}
    )
    assert unknown.status_code == 404


async def test_idempotency_key_returns_the_same_job(
    client: AsyncClient, auth: dict[str, str], sample_photos: list
) -> None:
    subject_id = await _subject(client, auth, sample_photos)
    body = {"subject_id": subject_id, "prompt": "a tuxedo"}
    headers = {**auth, "Idempotency-Key": "retry-1"}
    first = await client.post("/v1/generations", headers=headers, json=body)
    second = await client.post("/v1/generations", headers=headers, json=body)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]


async def test_metrics_and_health(client: AsyncClient, auth: dict[str, str]) -> None:
    assert (await client.get("/healthz")).json()["status"] == "ok"
    await client.get("/v1/jobs", headers=auth)
    text = (await client.get("/metrics")).text
    assert 'atelier_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert "atelier_http_request_duration_seconds_bucket" in text
