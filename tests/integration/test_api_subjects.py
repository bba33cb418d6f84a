"""Subjects over HTTP against real Postgres and a real blob directory."""

from __future__ import annotations

import io
from pathlib import Path

from httpx import ASGITransport, AsyncClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from api.app import create_app
from core.db.models import Subject, SubjectPhoto
from core.settings import Settings
from tests.conftest import photo_files
from tests.unit.test_photos import png_declaring


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


async def _count(sessions: async_sessionmaker[AsyncSession], model: type) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(model)) or 0)


def _png(size: tuple[int, int] = (256, 256)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 90, 60)).save(buf, "PNG")
    return buf.getvalue()


async def test_create_get_delete_subject(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list[tuple[str, bytes]],
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    created = await client.post(
        "/v1/subjects",
        headers=auth,
        files=photo_files(sample_photos),
        data={"class_noun": "woman", "name": "Eileen"},
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["photo_count"] == len(sample_photos)
    assert body["class_noun"] == "woman"
    assert len(body["token"]) == 3
    stored = _files_under(settings.blob_dir / "subjects" / body["id"])
    # Each photo and, next to it, the square crop around the face for training.
    assert len(stored) == 2 * len(sample_photos)
    async with sessions() as session:
        query = select(SubjectPhoto).order_by(col(SubjectPhoto.position))
        rows = (await session.scalars(query)).all()
    assert [r.position for r in rows] == list(range(len(sample_photos)))
    for row in rows:
        assert row.train_blob_key == row.blob_key.removesuffix(".png") + ".train.png"
        assert row.face_x is not None and row.face_y is not None
        assert row.face_w is not None and row.face_h is not None
        assert row.face_w >= settings.min_face_fraction * min(row.width, row.height)
        with Image.open(settings.blob_dir / row.train_blob_key) as crop:
            assert crop.format == "PNG" and crop.width == crop.height
            side = max(row.face_w, row.face_h)
            expected = min(round(settings.face_crop_scale * side), row.width, row.height)
            assert crop.width == expected

    got = await client.get(f"/v1/subjects/{body['id']}", headers=auth)
    assert got.status_code == 200 and got.json()["token"] == body["token"]

    deleted = await client.delete(f"/v1/subjects/{body['id']}", headers=auth)
    assert deleted.status_code == 204
    assert not (settings.blob_dir / "subjects" / body["id"]).exists()
    assert await _count(sessions, SubjectPhoto) == 0
    gone = await client.get(f"/v1/subjects/{body['id']}", headers=auth)
    assert gone.status_code == 404


async def test_other_accounts_subject_is_404(
    client: AsyncClient,
    auth: dict[str, str],
    other_auth: dict[str, str],
    sample_photos: list[tuple[str, bytes]],
) -> None:
    created = await client.post("/v1/subjects", headers=auth, files=photo_files(sample_photos))
    subject_id = created.json()["id"]
    for method, path in [
        ("GET", f"/v1/subjects/{subject_id}"),
        ("DELETE", f"/v1/subjects/{subject_id}"),
        ("POST", f"/v1/subjects/{subject_id}/train"),
    ]:
        response = await client.request(method, path, headers=other_auth)
        assert response.status_code == 404, (method, path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
    response = await client.post(
        "/v1/generations", headers=other_auth, json={"subject_id": subject_id, "prompt": "a hat"}
    )
    assert response.status_code == 404


async def test_missing_and_bad_keys_are_401(client: AsyncClient) -> None:
    missing = await client.get("/v1/jobs")
    assert missing.status_code == 401
    assert missing.json()["type"] == "/problems/unauthorized"
    assert missing.headers["www-authenticate"] == "Bearer"
    bad = await client.get("/v1/jobs", headers={"Authorization": "Bearer atl_nope"})
    assert bad.status_code == 401
    assert "invalid" in bad.json()["detail"]


async def test_bad_uploads_are_refused_and_leave_nothing(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list[tuple[str, bytes]],
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    good = photo_files(sample_photos[:3])
    truncated = sample_photos[0][1][: len(sample_photos[0][1]) // 2]
    gif = io.BytesIO()
    Image.new("RGB", (200, 200)).save(gif, "GIF")
    cases = {
        "too few": (good[:2], 422, "invalid-request"),
        "too many": (photo_files(sample_photos * 3), 422, "invalid-request"),
        "not an image": (
            [*good, ("photos", ("me.jpg", b"%PDF-1.4 definitely not a photo", "image/jpeg"))],
            422,
            "photo-rejected",
        ),
        "truncated": ([*good, ("photos", ("cut.jpg", truncated, "image/jpeg"))], 422, None),
        "gif": ([*good, ("photos", ("anim.gif", gif.getvalue(), "image/gif"))], 415, None),
        "decompression bomb": (
            [*good, ("photos", ("bomb.png", png_declaring(50_000, 50_000), "image/png"))],
            413,
            "photo-too-large",
        ),
        "too large": (
            [*good, ("photos", ("huge.png", b"\0" * (settings.max_photo_bytes + 1), "image/png"))],
            413,
            "photo-too-large",
        ),
    }
    files_before = _files_under(settings.blob_dir)
    for label, (files, status, code) in cases.items():
        response = await client.post("/v1/subjects", headers=auth, files=files)
        assert response.status_code == status, (label, response.text)
        problem = response.json()
        assert problem["status"] == status and problem["detail"], label
        assert "Traceback" not in response.text
        if code:
            assert problem["type"] == f"/problems/{code}", (label, problem)
    assert await _count(sessions, Subject) == 0
    assert _files_under(settings.blob_dir) == files_before


async def test_photo_without_a_face_is_refused_by_name_and_leaves_nothing(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list[tuple[str, bytes]],
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    files_before = _files_under(settings.blob_dir)
    files = photo_files(sample_photos[:3])
    files.insert(1, ("photos", ("landscape.png", _png((400, 300)), "image/png")))

    response = await client.post("/v1/subjects", headers=auth, files=files)

    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == "/problems/photo-rejected"
    assert problem["photo"] == "landscape.png"
    assert problem["reason"] == "no-face"
    assert "landscape.png" in problem["detail"]
    assert await _count(sessions, Subject) == 0
    assert await _count(sessions, SubjectPhoto) == 0
    assert _files_under(settings.blob_dir) == files_before


async def test_bad_class_noun(
    client: AsyncClient, auth: dict[str, str], sample_photos: list[tuple[str, bytes]]
) -> None:
    response = await client.post(
        "/v1/subjects", headers=auth, files=photo_files(sample_photos), data={"class_noun": "X!"}
    )
    assert response.status_code == 422
    assert response.json()["field"] == "class_noun"


async def test_exif_is_stripped_before_storing(
    client: AsyncClient,
    auth: dict[str, str],
    sample_photos: list[tuple[str, bytes]],
    settings: Settings,
) -> None:
    created = await client.post("/v1/subjects", headers=auth, files=photo_files(sample_photos))
    assert created.status_code == 201
    for path in _files_under(settings.blob_dir / "subjects" / created.json()["id"]):
        with Image.open(path) as stored:
            assert stored.format == "PNG"
            assert not stored.getexif()


async def test_photos_too_small_for_the_profile_are_refused_with_the_numbers(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    auth: dict[str, str],
    sample_photos: list[tuple[str, bytes]],
) -> None:
    """The demo photos (512 px, faces ~100-170 px) train on tiny; a deployment of
    sdxl (1024 px, crops of at least 768 px) refuses them, naming the numbers."""
    sdxl = create_app(settings.model_copy(update={"profile": "sdxl"}))
    portrait = dict(sample_photos)["01_portrait.jpg"]
    with Image.open(io.BytesIO(portrait)) as img:
        upscaled = io.BytesIO()
        img.resize((1000, 1000), Image.Resampling.LANCZOS).save(upscaled, "PNG")
    files_before = _files_under(settings.blob_dir)
    async with sdxl.router.lifespan_context(sdxl):
        transport = ASGITransport(app=sdxl, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url="http://testserver") as http:
            small = await http.post("/v1/subjects", headers=auth, files=photo_files(sample_photos))
            far = photo_files(sample_photos[:3])
            far[0] = ("photos", ("far.png", upscaled.getvalue(), "image/png"))
            # The 512 px photos come after it: far.png's crop is judged first.
            far_face = await http.post("/v1/subjects", headers=auth, files=far)

    assert small.status_code == 422, small.text
    assert small.headers["content-type"] == "application/problem+json"
    problem = small.json()
    assert problem["type"] == "/problems/photo-rejected"
    assert (problem["reason"], problem["photo"]) == ("photo-too-small", sample_photos[0][0])
    assert (problem["min_photo_side"], problem["profile"]) == (768, "sdxl")
    assert "too small for the sdxl profile, which trains at 1024 px" in problem["detail"]

    assert far_face.status_code == 422, far_face.text
    problem = far_face.json()
    assert (problem["reason"], problem["photo"]) == ("crop-too-small", "far.png")
    assert problem["crop_side"] < problem["min_crop_side"] == 768
    assert f"the face crop in far.png is {problem['crop_side']} px" in problem["detail"]
    assert "the sdxl profile trains at 1024 px and needs at least 768 px" in problem["detail"]
    assert await _count(sessions, Subject) == 0
    assert _files_under(settings.blob_dir) == files_before
