"""The OpenAPI document, made to say what the server really does.

FastAPI's generated document lists a success and a 422 ``application/json`` per
route. This module post-processes it once per app so that every operation lists
each problem+json status it can answer (those its route declares with
``responses=``, and those that follow from its shape: a key, path ids,
parameters, a POST that creates something), all with one ``Problem`` schema whose stable
``type`` values are listed per status, and the limits the server enforces that
come from settings (prompt lengths, image counts, known crawl sites...).
tests/integration/test_api_contract.py holds the server to it with schemathesis.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi

from api.problems import MEDIA_TYPE, STATUS_BY_KIND, http_error
from core.catalog.sites import known_sites
from core.errors import AtelierError
from core.jobs.specs.generation import MAX_SEED
from core.settings import Settings
from core.subjects import MAX_NAME_CHARS

_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
# Money in a query string or a JSON body: what the server's Decimal(12, 2) takes.
# Query values are strings anyway; a JSON body may also send a whole number.
MONEY_PATTERN = r"^[0-9]{1,10}(\.[0-9]{1,2})?$"
MONEY_QUERY_SCHEMA: dict[str, Any] = {
    "anyOf": [{"type": "string", "pattern": MONEY_PATTERN}, {"type": "null"}]
}
_MONEY_BODY_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "pattern": MONEY_PATTERN},
        {"type": "integer", "minimum": 0, "maximum": 9_999_999_999},
        {"type": "null"},
    ]
}
# Postgres text and jsonb cannot hold NUL: strings that reach them are refused at
# the boundary (422) with this pattern, which the document states too.
NO_NUL = r"^[^\x00]*$"
# Problems raised outside core's AtelierError classes (FastAPI's request
# validation, Starlette's routing, api/outages.py).
_API_PROBLEM_TYPES = {
    400: ["bad-request"],
    404: ["not-found"],
    405: ["method-not-allowed"],
    422: ["invalid-request"],
    503: ["dependency-unavailable"],
}
_TITLES = {
    400: "The body could not be parsed",
    401: "Missing or unknown API key",
    403: "The key's account may not do this (an operator's key is needed)",
    404: "No such resource for this account",
    409: "Conflicts with the resource's current state, or an Idempotency-Key in use",
    413: "Over a size limit",
    415: "A format the server does not take",
    422: "Invalid request: a parameter, the body, or a rule across fields",
    503: "A dependency (Postgres, Redis, a model) is unavailable; retry later",
}


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the post-processed document as /openapi.json (built on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_exception_handler(405, _method_not_allowed)


def build_document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    document = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    types = problem_types()
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = _problem_schema(types)
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _state_limits(schemas, settings)
    document["components"].setdefault("securitySchemes", {})["SignedUrl"] = {
        "type": "apiKey",
        "in": "query",
        "name": "signature",
        "description": "a signed media URL (with its `expires`), as the API's JSON gives out",
    }
    queries = _query_limits(settings)
    for path, method, operation in _operations(document):
        for param in operation.get("parameters", []):
            _limit({"p": param["schema"]}, "p", **queries.get((path, param["name"]), {}))
        for status in sorted(_statuses(path, method, operation, schemas)):
            _problem_response(operation, status, path, types)
    return document


def problem_types() -> dict[int, list[str]]:
    """Every problem ``type`` the API answers with, by status: core's error classes
    (wherever they are defined, subclasses included) and the API's own."""
    found: dict[int, set[str]] = {s: set(t) for s, t in _API_PROBLEM_TYPES.items()}
    for cls in _subclasses(AtelierError):
        found.setdefault(STATUS_BY_KIND[cls.kind], set()).add(cls.code)
    return {status: sorted(codes) for status, codes in sorted(found.items())}


def _subclasses(cls: type[AtelierError]) -> Iterator[type[AtelierError]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _problem_schema(types: dict[int, list[str]]) -> dict[str, Any]:
    listed = "; ".join(
        f"{status}: " + ", ".join(f"`/problems/{t}`" for t in codes)
        for status, codes in types.items()
    )
    return {
        "type": "object",
        "title": "Problem",
        "description": "RFC 9457 problem details. Extension members (`errors`, `field`,"
        " `job_id`...) say more about some problems.",
        "required": ["type", "title", "status", "detail", "instance"],
        "properties": {
            "type": {
                "type": "string",
                "format": "uri-reference",
                "description": f"stable identifier of the problem, by status: {listed}",
                "examples": ["/problems/not-found"],
            },
            "title": {"type": "string", "description": "the same for every problem of a type"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string", "description": "what went wrong this time"},
            "instance": {"type": "string", "description": "the request's path"},
        },
        "additionalProperties": True,
    }


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method in _METHODS:
                yield path, method.upper(), operation


def _statuses(
    path: str, method: str, operation: dict[str, Any], schemas: dict[str, Any]
) -> set[int]:
    """The problem statuses an operation can answer: those its route declares, and
    those that follow from its shape."""
    statuses = {int(s) for s in operation["responses"] if s.isdigit() and int(s) >= 400}
    if operation.get("security"):
        # The key is checked against Postgres: a bad one is 401, Postgres down 503.
        statuses |= {401, 503}
    params = operation.get("parameters", [])
    names = {p["name"] for p in params}
    if any(p["in"] == "path" for p in params) or _names_an_id(operation, schemas):
        statuses.add(404)
    if params or "requestBody" in operation:
        statuses.add(422)
    if "requestBody" in operation:
        statuses.add(400)  # a JSON or multipart body that does not parse
    if "signature" in names:
        statuses.add(403)  # a signed URL whose signature does not match, or expired
        # Either credential will do: a key, or a signed URL (expires + signature).
        operation["security"] = [*operation.get("security", []), {"SignedUrl": []}]
    if method == "POST" and path.startswith("/v1/"):
        # api/idempotency.py keys every POST under /v1/: a key in use (409), or
        # reused for another request (422).
        statuses |= {409, 422}
    return statuses


def _names_an_id(operation: dict[str, Any], schemas: dict[str, Any]) -> bool:
    """Whether the JSON body names a resource by id (a subject...), which may not
    exist: a ``format: uuid`` property at its top level, or in an array there."""
    content = operation.get("requestBody", {}).get("content", {})
    ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
    body = schemas.get(ref.rsplit("/", 1)[-1], {})
    for prop in body.get("properties", {}).values():
        for branch in prop.get("anyOf", [prop]):
            if "uuid" in (branch.get("format"), branch.get("items", {}).get("format")):
                return True
    return False


def allowed_methods(document: dict[str, Any], path: str) -> list[str]:
    """The methods the document lists for a concrete path, for a 405's Allow:
    Starlette names only those of the first route matching the path."""
    methods: set[str] = set()
    for template, item in document.get("paths", {}).items():
        pattern = re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            methods |= {m.upper() for m in item if m in _METHODS}
    return sorted(methods)


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    response = await http_error(request, exc)
    allowed = allowed_methods(request.app.openapi(), request.url.path)
    if allowed:
        response.headers["Allow"] = ", ".join(allowed)
    return response


def _problem_response(
    operation: dict[str, Any], status: int, path: str, types: dict[int, list[str]]
) -> None:
    response = operation["responses"].setdefault(str(status), {})
    codes = types.get(status, [])
    listed = ", ".join(f"`/problems/{code}`" for code in codes)
    described = response.get("description") or _TITLES.get(status, "Problem")
    if described in ("Validation Error", "Successful Response"):
        described = _TITLES[status]
    response["description"] = f"{described}. Problem types: {listed}" if listed else described
    code = codes[0] if codes else "problem"
    example = {
        "type": f"/problems/{code}",
        "title": code.replace("-", " ").capitalize(),
        "status": status,
        "detail": _TITLES.get(status, "a problem"),
        "instance": path,
    }
    response["content"] = {MEDIA_TYPE: {"schema": PROBLEM_REF, "example": example}}
    if status == 401:
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    if status == 503:
        response.setdefault("headers", {})["Retry-After"] = {
            "description": "seconds to wait before retrying (dependency outages)",
            "schema": {"type": "integer", "minimum": 0},
        }


def _state_limits(schemas: dict[str, Any], settings: Settings) -> None:
    """State the limits the server enforces, several of them settings, in the
    request bodies' schemas (a schema split in -Input/-Output gets them on both)."""
    limits = _settings_limits(settings)
    for name, schema in schemas.items():
        props = schema.get("properties", {})
        if name.startswith("ProductFilters"):
            for field in ("min_price", "max_price"):
                if field in props:
                    props[field] = {**_MONEY_BODY_SCHEMA, "title": props[field].get("title")}
        for prefix, fields in limits.items():
            if name.startswith(prefix):
                for field, constraints in fields.items():
                    _limit(props, field, **constraints)


def _settings_limits(settings: Settings) -> dict[str, dict[str, dict[str, Any]]]:
    """By request schema name (prefix), field: the JSON Schema keywords that say
    what core checks (core/jobs/specs, core/subjects.py, core/handlers/crawl.py)."""
    profiles = {"enum": list(settings.served_profiles)}
    generation: dict[str, dict[str, Any]] = {
        # Whitespace is collapsed first: a prompt needs something besides it.
        "prompt": {"maxLength": settings.max_prompt_chars, "pattern": r"\S"},
        "negative_prompt": {"maxLength": settings.max_prompt_chars},
        "num_images": {"maximum": settings.max_images},
        "candidates": {"maximum": settings.max_candidates},
        # Candidate i uses seed + i: the last candidate's seed must stay in range too.
        "seed": {"maximum": MAX_SEED - settings.max_candidates},
        "profile": profiles,
    }
    return {
        "GenerationSpec": generation,
        # The spin video is refused until it ships (core/looks.py).
        "LookSpec": {**generation, "video": {"const": False}},
        "TrainRequest": {
            "steps": {"maximum": settings.max_train_steps},
            "with_subjects": {"maxItems": settings.max_subjects_per_run - 1, "uniqueItems": True},
            "profile": profiles,
        },
        "CrawlSpec": {"site": {"enum": list(known_sites(settings))}},
        "ClipFinetuneSpec": {"profile": {"enum": [settings.clip_profile]}},
        "Body_create_subject": {
            "photos": {"minItems": settings.min_photos, "maxItems": settings.max_photos},
            # core.subjects.check_class_noun, after strip() and lower().
            "class_noun": {"pattern": r"^\s*[A-Za-z][A-Za-z ]{0,30}[A-Za-z]\s*$"},
            "name": {"maxLength": MAX_NAME_CHARS, "pattern": NO_NUL},
        },
    }


def _query_limits(settings: Settings) -> dict[tuple[str, str], dict[str, Any]]:
    """By (path, query parameter): the limits core checks that are settings."""
    # Whitespace is collapsed before the limit is checked (core/shop/searcher.py).
    query = {"maxLength": settings.max_search_query_chars, "pattern": r"\S"}
    return {("/v1/products/search", "q"): query}


def _limit(props: dict[str, Any], field: str, **limits: Any) -> None:
    """Add ``limits`` to a property, inside its non-null branch if it is optional."""
    prop = props.get(field)
    if prop is None:
        return
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") not in (None, "null"):
            branch.update(limits)
