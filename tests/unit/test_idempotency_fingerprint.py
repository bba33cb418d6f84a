"""What makes two keyed requests "the same": the canonical body and the fingerprint."""

from __future__ import annotations

import httpx

from api.idempotency import canonical_body, kept
from core.idempotency import fingerprint

PHOTOS = [
    ("photos", ("a.jpg", b"\xff\xd8one", "image/jpeg")),
    ("photos", ("b.jpg", b"two", "image/jpeg")),
]


def _multipart(
    boundary: str,
    files: list[tuple[str, tuple[str, bytes, str]]] = PHOTOS,
    data: dict[str, str] | None = None,
) -> bytes:
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    request = httpx.Request("POST", "http://x/", files=files, data=data, headers=headers)
    return canonical_body(request.headers["content-type"], request.read())


def test_json_ignores_key_order_and_whitespace() -> None:
    a = canonical_body("application/json", b'{"prompt": "a hat", "seed": 7}')
    b = canonical_body("application/json; charset=utf-8", b'{"seed":7,\n "prompt":"a hat"}')
    assert a == b
    assert a != canonical_body("application/json", b'{"prompt": "a cap", "seed": 7}')


def test_json_nested_objects_are_sorted_too() -> None:
    a = canonical_body("application/json", b'{"o": {"x": 1, "y": [1, {"b": 2, "a": 1}]}}')
    b = canonical_body("application/json", b'{"o": {"y": [1, {"a": 1, "b": 2}], "x": 1}}')
    assert a == b
    # Arrays keep their order: it means something.
    assert a != canonical_body("application/json", b'{"o": {"x": 1, "y": [{"a": 1, "b": 2}, 1]}}')


def test_malformed_json_is_compared_as_sent() -> None:
    assert canonical_body("application/json", b"{nope") == b"application/json\n{nope"


def test_empty_body_is_empty_whatever_its_type() -> None:
    assert canonical_body("application/json", b"") == canonical_body(None, b"") == b""


def test_media_type_counts() -> None:
    body = b'{"a": 1}'
    assert canonical_body("application/json", body) != canonical_body("text/plain", body)


def test_multipart_does_not_depend_on_the_boundary() -> None:
    assert _multipart("boundary-one") == _multipart("another-boundary-2")


def test_multipart_parts_content_names_and_order_count() -> None:
    base = _multipart("b1")
    other_content = [PHOTOS[0], ("photos", ("b.jpg", b"TWO", "image/jpeg"))]
    other_name = [PHOTOS[0], ("photos", ("c.jpg", b"two", "image/jpeg"))]
    other_type = [PHOTOS[0], ("photos", ("b.jpg", b"two", "image/png"))]
    other_field = [PHOTOS[0], ("images", ("b.jpg", b"two", "image/jpeg"))]
    variants = [other_content, other_name, other_type, other_field, list(reversed(PHOTOS))]
    assert all(_multipart("b2", files) != base for files in variants)
    man, woman = ({"class_noun": noun} for noun in ("man", "woman"))
    assert _multipart("b3", data=man) != _multipart("b3", data=woman)


def test_fingerprint_covers_method_target_and_body() -> None:
    base = fingerprint("POST", "/v1/generations", b"x")
    assert base == fingerprint("post", "/v1/generations", b"x")
    assert base != fingerprint("PUT", "/v1/generations", b"x")
    assert base != fingerprint("POST", "/v1/generations?wait=1", b"x")
    assert base != fingerprint("POST", "/v1/generations", b"y")
    # Fields are framed: moving bytes from the path into the body changes it.
    assert fingerprint("POST", "/v1/a", b"b") != fingerprint("POST", "/v1/", b"ab")


def test_only_responses_of_requests_that_ran_are_kept() -> None:
    assert all(kept(status) for status in (200, 201, 202, 204, 404, 409))
    assert not any(kept(status) for status in (400, 401, 403, 413, 415, 422, 429, 500, 503))
