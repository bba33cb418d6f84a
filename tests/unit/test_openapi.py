"""The OpenAPI document lists what each operation can answer (no server needed);
tests/integration/test_api_contract.py holds the running server to it."""

from __future__ import annotations

from typing import Any

import pytest

from api.app import create_app
from api.openapi import allowed_methods
from core.settings import Settings

# Problem statuses each operation must list, at least.
EXPECTED = {
    ("post", "/v1/subjects"): {400, 401, 409, 413, 415, 422, 503},
    ("get", "/v1/subjects/{subject_id}"): {401, 404, 422, 503},
    ("delete", "/v1/subjects/{subject_id}"): {401, 404, 422, 503},
    ("post", "/v1/subjects/{subject_id}/train"): {400, 401, 404, 409, 422, 503},
    ("post", "/v1/generations"): {400, 401, 404, 409, 422, 503},
    ("get", "/v1/jobs"): {401, 422, 503},
    ("post", "/v1/jobs/{job_id}/cancel"): {401, 404, 409, 422, 503},
    ("get", "/v1/products"): {401, 422, 503},
    ("post", "/v1/products/search"): {400, 401, 409, 413, 422, 503},
    ("get", "/v1/outputs/{output_id}"): {401, 403, 404, 422, 503},
    ("post", "/v1/admin/crawls"): {400, 401, 403, 409, 422, 503},
    ("get", "/v1/admin/clip/versions"): {401, 403, 422, 503},
}


@pytest.fixture(scope="module")
def limits() -> Settings:
    return Settings(max_prompt_chars=321, max_photos=7, min_photos=2)


@pytest.fixture(scope="module")
def document(limits: Settings) -> dict[str, Any]:
    return create_app(limits).openapi()


@pytest.mark.parametrize(("method", "path"), sorted(EXPECTED))
def test_operation_lists_its_problem_statuses(
    document: dict[str, Any], method: str, path: str
) -> None:
    responses = document["paths"][path][method]["responses"]
    listed = {int(s) for s in responses if int(s) >= 400}
    assert EXPECTED[(method, path)] <= listed
    for status in listed:
        content = responses[str(status)]["content"]
        assert list(content) == ["application/problem+json"], (status, content)
        assert content["application/problem+json"]["schema"] == {
            "$ref": "#/components/schemas/Problem"
        }
        assert "/problems/" in responses[str(status)]["description"]


def test_every_operation_answers_problems_only_as_problem_json(document: dict[str, Any]) -> None:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    assert list(response["content"]) == ["application/problem+json"], (
                        method,
                        path,
                        status,
                    )
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_problem_types_are_listed_per_status(document: dict[str, Any]) -> None:
    described = document["components"]["schemas"]["Problem"]["properties"]["type"]["description"]
    for code in ("not-found", "photo-too-large", "idempotency-key-in-use", "invalid-request"):
        assert f"/problems/{code}" in described


def test_limits_from_settings_are_stated(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    prompt = schemas["GenerationSpec"]["properties"]["prompt"]
    assert prompt["maxLength"] == 321 and prompt["pattern"] == r"\S"
    photos = next(
        s["properties"]["photos"] for n, s in schemas.items() if n.startswith("Body_create_subject")
    )
    assert (photos["minItems"], photos["maxItems"]) == (2, 7)
    sites = schemas["CrawlSpec"]["properties"]["site"]["enum"]
    assert "fixture" in sites
    q = next(p for p in document["paths"]["/v1/products"]["get"]["parameters"] if p["name"] == "q")
    assert q["schema"]["anyOf"][0]["pattern"] == r"^[^\x00]*$"


def test_binary_and_metrics_content_types_are_documented(document: dict[str, Any]) -> None:
    paths = document["paths"]
    assert "image/png" in paths["/v1/outputs/{output_id}"]["get"]["responses"]["200"]["content"]
    assert "multipart/form-data" in paths["/v1/subjects"]["post"]["requestBody"]["content"]
    metrics = paths["/metrics"]["get"]["responses"]["200"]["content"]
    assert any(media.startswith("text/plain") for media in metrics)


def test_allow_lists_every_method_of_the_path(document: dict[str, Any]) -> None:
    assert allowed_methods(document, "/v1/admin/crawls") == ["GET", "POST"]
    assert allowed_methods(document, "/v1/subjects/abc") == ["DELETE", "GET"]
    assert allowed_methods(document, "/nowhere") == []
