"""core.faces and the face checks of core.photos, on the demo portraits."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from core.errors import PhotoRejected
from core.faces import (
    DETECT_SIDE,
    FaceBox,
    _without_nested,
    crop_box,
    detect_faces,
    training_crop,
)
from core.photos import PhotoLimits, normalize_photo
from core.settings import Settings

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo" / "sample_subject"
LIMITS = PhotoLimits.from_settings(Settings())
GREY = (128, 128, 128)

# Where the face is in each demo photo (after EXIF orientation), as measured
# when the detector was chosen; a box may move a few pixels between OpenCV
# versions, so the tests allow some slack.
EXPECTED = {
    "01_portrait.jpg": FaceBox(175, 64, 99, 99),
    "02_closeup.jpg": FaceBox(172, 105, 169, 169),
    "03_mirrored.jpg": FaceBox(200, 80, 120, 120),
    "04_rotated_exif.jpg": FaceBox(132, 104, 174, 174),
}
SLACK = 12  # pixels, on each coordinate


def demo(name: str) -> Image.Image:
    with Image.open(DEMO_DIR / name) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def near(found: FaceBox, expected: FaceBox, slack: float = SLACK) -> bool:
    pairs = zip(
        (found.x, found.y, found.w, found.h),
        (expected.x, expected.y, expected.w, expected.h),
        strict=True,
    )
    return all(abs(a - b) <= slack for a, b in pairs)


def blend_in(canvas: Image.Image, img: Image.Image, at: tuple[int, int]) -> None:
    """Paste ``img`` with soft edges: the hard corners of a plain paste can look
    like a face to the cascade, and real photos have no such corners."""
    feather = 12
    mask = Image.new("L", img.size, 0)
    inner = (feather, feather, img.width - feather, img.height - feather)
    ImageDraw.Draw(mask).rectangle(inner, fill=255)
    canvas.paste(img, at, mask.filter(ImageFilter.GaussianBlur(feather / 2)))


def two_faces() -> Image.Image:
    canvas = Image.new("RGB", (1024, 512), GREY)
    canvas.paste(demo("01_portrait.jpg"), (0, 0))
    canvas.paste(demo("03_mirrored.jpg"), (512, 0))
    return canvas


def rejected_reason(img: Image.Image, name: str) -> PhotoRejected:
    with pytest.raises(PhotoRejected) as info:
        normalize_photo(png(img), name, LIMITS)
    err = info.value
    assert type(err) is PhotoRejected
    assert name in err.detail
    assert err.extra["photo"] == name
    return err


# --- detection --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_demo_photo_has_one_face_where_expected(name: str) -> None:
    faces = detect_faces(demo(name))
    assert len(faces) == 1, faces
    assert near(faces[0], EXPECTED[name]), faces[0]


def test_boxes_are_in_full_size_coordinates() -> None:
    # Twice DETECT_SIDE: detection runs on a half-size copy.
    img = demo("02_closeup.jpg")
    factor = 2 * DETECT_SIDE / img.width
    big = img.resize((2 * DETECT_SIDE, round(img.height * factor)), Image.Resampling.LANCZOS)
    expected = EXPECTED["02_closeup.jpg"]
    scaled = FaceBox(*(round(v * factor) for v in (expected.x, expected.y, expected.w, expected.h)))

    faces = detect_faces(big, min_side=big.width // 10)

    assert len(faces) == 1, faces
    assert near(faces[0], scaled, SLACK * factor), (faces[0], scaled)


def test_solid_and_drawn_images_have_no_face() -> None:
    assert detect_faces(Image.new("RGB", (640, 480), (120, 90, 60))) == []
    assert detect_faces(Image.new("L", (300, 300), 0)) == []
    smiley = Image.new("RGB", (400, 400), "white")
    draw = ImageDraw.Draw(smiley)
    draw.ellipse((80, 80, 320, 320), fill="yellow", outline="black", width=6)
    draw.ellipse((150, 150, 180, 190), fill="black")
    draw.ellipse((220, 150, 250, 190), fill="black")
    draw.arc((140, 180, 260, 280), 20, 160, fill="black", width=6)
    assert detect_faces(smiley) == []


def test_two_people_side_by_side_are_two_faces_largest_first() -> None:
    faces = detect_faces(two_faces())

    assert len(faces) == 2, faces
    assert faces[0].w * faces[0].h >= faces[1].w * faces[1].h
    left, right = sorted(faces, key=lambda f: f.x)
    assert near(left, EXPECTED["01_portrait.jpg"], 2 * SLACK), left
    moved = EXPECTED["03_mirrored.jpg"]
    assert near(right, FaceBox(moved.x + 512, moved.y, moved.w, moved.h), 2 * SLACK), right


def test_a_box_inside_a_larger_one_is_the_same_face() -> None:
    face, eye, elsewhere = (
        FaceBox(100, 100, 200, 200),
        FaceBox(150, 150, 60, 60),
        FaceBox(0, 0, 50, 50),
    )
    assert _without_nested([face, eye, elsewhere]) == [face, elsewhere]


@pytest.mark.parametrize("light", [0.3, 1.8], ids=["dark", "bright"])
def test_badly_exposed_photos_still_show_their_face(light: float) -> None:
    for name, expected in EXPECTED.items():
        img = ImageEnhance.Brightness(demo(name)).enhance(light)
        photo = normalize_photo(png(img), name, LIMITS)
        assert near(photo.face, expected, 2 * SLACK), (name, photo.face)


def test_face_on_a_large_flat_background_is_found() -> None:
    # A global histogram equalization would spend most grey levels on the
    # backdrop and lose this face; per-tile equalization keeps it.
    canvas = Image.new("RGB", (1000, 1000), GREY)
    blend_in(
        canvas, demo("01_portrait.jpg").resize((560, 560), Image.Resampling.LANCZOS), (220, 220)
    )
    (face,) = detect_faces(canvas)
    assert near(face, FaceBox(220 + 194, 220 + 72, 106, 106), 2 * SLACK), face


def test_min_side_skips_smaller_faces() -> None:
    img = demo("01_portrait.jpg")
    assert detect_faces(img, min_side=EXPECTED["01_portrait.jpg"].w * 2) == []


def test_detection_is_safe_from_several_threads() -> None:
    img = demo("03_mirrored.jpg")
    results: list[list[FaceBox]] = []
    threads = [threading.Thread(target=lambda: results.append(detect_faces(img))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    assert all(r == results[0] and len(r) == 1 for r in results)


# --- training crop ----------------------------------------------------------------


def contains(outer: tuple[int, int, int, int], face: FaceBox) -> bool:
    left, top, right, bottom = outer
    return (
        left <= face.x and top <= face.y and face.x + face.w <= right and face.y + face.h <= bottom
    )


def test_crop_is_a_centred_square_of_scale_face_sides_when_there_is_room() -> None:
    face = FaceBox(450, 300, 100, 100)
    box = crop_box((1000, 800), face, 3.0)
    assert box == (350, 200, 650, 500)


@pytest.mark.parametrize(
    "face",
    [FaceBox(0, 0, 100, 100), FaceBox(900, 700, 100, 100), FaceBox(10, 650, 120, 120)],
    ids=["top-left", "bottom-right", "bottom-left"],
)
def test_crop_near_an_edge_is_shifted_inside(face: FaceBox) -> None:
    left, top, right, bottom = box = crop_box((1000, 800), face, 3.0)
    assert right - left == bottom - top == 3 * face.side
    assert 0 <= left and 0 <= top and right <= 1000 and bottom <= 800
    assert contains(box, face)


def test_crop_larger_than_the_image_is_clamped_to_its_shorter_side() -> None:
    face = FaceBox(150, 200, 150, 150)  # 3x = 450 > 400
    left, top, right, bottom = box = crop_box((400, 600), face, 3.0)
    assert right - left == bottom - top == 400
    assert (left, right) == (0, 400)
    assert contains(box, face)


def test_face_filling_the_image_crops_to_the_face() -> None:
    assert crop_box((200, 200), FaceBox(0, 0, 200, 200), 3.0) == (0, 0, 200, 200)


def test_scale_one_is_the_face_box() -> None:
    face = FaceBox(40, 50, 60, 60)
    assert crop_box((300, 300), face, 1.0) == (40, 50, 100, 110)


def test_face_outside_the_image_is_an_error() -> None:
    with pytest.raises(ValueError):
        crop_box((100, 100), FaceBox(80, 80, 40, 40), 3.0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_training_crop_of_each_demo_photo_holds_its_face(name: str) -> None:
    img = demo(name)
    (face,) = detect_faces(img)
    crop = training_crop(img, face, 3.0)

    assert crop.width == crop.height
    assert crop.width == min(3 * face.side, *img.size)
    assert contains(crop_box(img.size, face, 3.0), face)
    # The crop still shows that one face.
    assert len(detect_faces(crop)) == 1


# --- what normalize_photo makes of faces -------------------------------------------


def test_accepted_photo_carries_its_face_and_training_crop() -> None:
    photo = normalize_photo((DEMO_DIR / "04_rotated_exif.jpg").read_bytes(), "me.jpg", LIMITS)

    assert near(photo.face, EXPECTED["04_rotated_exif.jpg"])
    with Image.open(io.BytesIO(photo.train_data)) as crop:
        crop.load()
        assert (crop.format, crop.mode) == ("PNG", "RGB")
        assert crop.width == crop.height == min(3 * photo.face.side, photo.width, photo.height)
        assert not crop.info and not crop.getexif()


def test_face_crop_scale_comes_from_the_limits() -> None:
    data = (DEMO_DIR / "01_portrait.jpg").read_bytes()
    limits = PhotoLimits.from_settings(Settings(face_crop_scale=2.0))
    photo = normalize_photo(data, "me.jpg", limits)
    with Image.open(io.BytesIO(photo.train_data)) as crop:
        assert crop.size == (2 * photo.face.side, 2 * photo.face.side)


def test_photo_without_a_face_is_refused_as_no_face() -> None:
    err = rejected_reason(Image.new("RGB", (400, 300), (200, 180, 160)), "wall.png")
    assert err.extra["reason"] == "no-face"
    assert err.detail.startswith("no face found in wall.png")


def test_photo_of_two_people_is_refused_as_several_faces() -> None:
    err = rejected_reason(two_faces(), "couple.png")
    assert err.extra["reason"] == "several-faces"
    assert err.extra["faces"] == 2
    assert err.detail.startswith("2 faces in couple.png; upload photos of one person")


def test_face_too_small_is_refused_with_the_sizes() -> None:
    # The 512-pixel portrait (face ~95 px) shrunk into a 1000x1000 photo: its
    # face is about 60 px, under the 100 px that 10% of the shorter side asks.
    canvas = Image.new("RGB", (1000, 1000), GREY)
    blend_in(
        canvas, demo("01_portrait.jpg").resize((320, 320), Image.Resampling.LANCZOS), (340, 340)
    )
    limits = PhotoLimits.from_settings(Settings(stored_photo_side=1000))
    with pytest.raises(PhotoRejected) as info:
        normalize_photo(png(canvas), "far.png", limits)
    err = info.value

    assert err.extra["reason"] == "face-too-small"
    assert err.extra["min_face_side"] == 100
    assert 40 <= err.extra["face_side"] < 100
    assert "far.png" in err.detail
    assert f"{err.extra['face_side']} pixels" in err.detail and "at least 100" in err.detail

    # The same photo passes where a smaller face is enough.
    lenient = PhotoLimits.from_settings(Settings(stored_photo_side=1000, min_face_fraction=0.05))
    assert normalize_photo(png(canvas), "far.png", lenient).face.side == err.extra["face_side"]


def test_a_small_second_face_beside_a_large_one_is_ignored() -> None:
    # A bystander far behind: under the minimum face size, so not "two people".
    canvas = demo("02_closeup.jpg").resize((1000, 1000), Image.Resampling.LANCZOS)
    bystander = demo("01_portrait.jpg").resize((300, 300), Image.Resampling.LANCZOS)
    blend_in(canvas, bystander, (0, 700))
    limits = PhotoLimits.from_settings(Settings(stored_photo_side=1000))
    seen = detect_faces(canvas, min_side=50)
    assert len(seen) == 2 and seen[1].side < 100  # sanity: both are seen

    photo = normalize_photo(png(canvas), "crowd.png", limits)

    assert photo.face == seen[0]
    assert photo.face.side > 300
