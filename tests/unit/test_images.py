"""Tests for inference.images: every test image is generated in memory with Pillow (no files, no network)."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from inference import images
from inference.errors import ImageDimensionsError, ImageTooLargeError, InvalidImageError, InvalidInputError
from inference.images import (
    ImageLimits,
    SourceImage,
    content_type,
    decode_data_url,
    encode_image,
    file_extension,
    load_source_image,
    output_size,
    prepare_source,
    to_rgb,
)
from tests.support.image_samples import (
    animated,
    bomb_png,
    corrupt_jpeg,
    corrupt_png,
    encode,
    exif_jpeg,
    noise,
    palette_image,
    sixteen_bit,
)

ROOT = Path(__file__).resolve().parents[2]


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def pixel(source: SourceImage, xy: tuple[int, int] = (0, 0)) -> tuple[int, int, int]:
    return source.image.getpixel(xy)


def close(actual, expected, tolerance: int = 3) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# --- accepted formats and data URLs -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt):
    data = encode(noise(64, 48), fmt)
    source = load_source_image(data)
    assert (source.format, source.size, source.byte_size) == (fmt.lower(), (64, 48), len(data))
    assert (source.width, source.height, source.image.mode) == (64, 48, "RGB")


@pytest.mark.parametrize("mime", ["image/png", "image/jpeg", "application/octet-stream", "IMAGE/GIF"])
def test_data_url_content_is_sniffed_not_declared(mime):
    data = encode(noise(), "JPEG")
    assert decode_data_url(data_url(data, mime)) == data
    assert load_source_image(decode_data_url(data_url(data, mime), ImageLimits().max_bytes)).format == "jpeg"


def test_data_url_tolerates_line_breaks_and_missing_padding():
    data = encode(noise(31, 17), "PNG")
    payload = base64.encodebytes(data).decode()  # 76-char lines, like the base64 CLI
    assert "\n" in payload
    assert decode_data_url(f"  data:image/png;base64,{payload}  ") == data
    assert decode_data_url("data:image/png;base64," + base64.b64encode(data).decode().rstrip("=")) == data


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(b"\x89PNG\r\n\x1a\n").decode(),  # bare base64: we require the data: prefix
        "https://example.com/cat.png",
        "data:image/png,plain-text-not-base64",
        "data:image/png;base64",
        "data:image/png;base64,@@@not base64!!!",
        "data:image/png;base64,A",
    ],
)
def test_bad_data_urls_are_invalid_image(text):
    with pytest.raises(InvalidImageError) as info:
        decode_data_url(text)
    assert info.value.code == "invalid_image"


def test_data_url_must_be_a_string():
    with pytest.raises(InvalidImageError):
        decode_data_url(b"data:image/png;base64,AAAA")  # type: ignore[arg-type]


# --- rejected formats and corrupt files ---------------------------------------------------------------


REJECTED = {
    "gif": encode(noise(mode="P"), "GIF"),
    "bmp": encode(noise(), "BMP"),
    "tiff": encode(noise(), "TIFF"),
    "ico": encode(noise(32, 32), "ICO"),
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "text": b"hello, this is not an image",
    "empty": b"",
    "garbage": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "riff_not_webp": b"RIFF\x10\x00\x00\x00WAVEfmt " + bytes(8),
}


@pytest.mark.parametrize("name", REJECTED)
def test_unaccepted_formats_are_invalid_image(name):
    with pytest.raises(InvalidImageError) as info:
        load_source_image(REJECTED[name])
    assert info.value.code == "invalid_image"
    assert "JPEG, PNG, WEBP" in info.value.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("load_truncated", [False, True])
def test_truncated_images_are_rejected_whatever_pillow_flag(fmt, load_truncated, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", load_truncated)
    data = encode(noise(128, 128), fmt)
    with pytest.raises(InvalidImageError) as info:
        load_source_image(data[: len(data) // 2])
    assert info.value.code == "invalid_image"


def test_jpeg_with_exif_thumbnail_eoi_is_still_truncated():
    # The EXIF thumbnail carries its own end-of-image marker; it must not make a cut file look complete.
    thumb = encode(noise(16, 16), "JPEG")
    exif = Image.Exif()
    exif[0x010E] = "x"
    data = encode(noise(256, 256), "JPEG", exif=exif.tobytes() + thumb)
    assert data.find(b"\xff\xd9") < len(data) // 2
    with pytest.raises(InvalidImageError):
        load_source_image(data[: len(data) // 2])


def test_jpeg_trailer_after_end_of_image_is_accepted():
    data = encode(noise(), "JPEG") + b"SEFT-vendor-trailer"
    assert load_source_image(data).size == (64, 48)


def test_corrupt_body_with_intact_framing_is_invalid_image():
    for data in (corrupt_png(), corrupt_jpeg()):
        with pytest.raises(InvalidImageError) as info:
            load_source_image(data)
        assert "could not be decoded" in info.value.message


# --- size limits -------------------------------------------------------------------------------------


def test_bytes_over_limit_are_too_large_before_decoding(monkeypatch):
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("decoded an oversized image"))
    data = encode(noise(), "PNG")
    with pytest.raises(ImageTooLargeError) as info:
        load_source_image(data, ImageLimits(max_bytes=len(data) - 1))
    assert info.value.code == "image_too_large"
    with pytest.raises(ImageTooLargeError):
        load_source_image(b"\x89PNG\r\n\x1a\n" + bytes(10 * 1024 * 1024))


def test_default_limit_accepts_exactly_ten_mib_data_url():
    data = b"\xff\xd8\xff" + bytes(10 * 1024 * 1024 - 3)
    assert decode_data_url(data_url(data)) == data


@pytest.mark.parametrize("megabytes", [10.01, 100])
def test_huge_data_url_is_refused_from_its_length_without_decoding(megabytes, monkeypatch):
    monkeypatch.setattr(
        images.base64, "b64decode", lambda *a, **k: pytest.fail("decoded an oversized payload")
    )
    text = "data:image/png;base64," + "A" * int(megabytes * 1024 * 1024 * 4 / 3)
    started = time.perf_counter()
    with pytest.raises(ImageTooLargeError) as info:
        load_source_image(decode_data_url(text, ImageLimits().max_bytes))
    assert info.value.code == "image_too_large"
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize("size", [(3000, 100), (100, 3000), (2049, 2048)])
def test_dimensions_over_limit(size):
    with pytest.raises(ImageDimensionsError) as info:
        load_source_image(encode(Image.new("RGB", size), "PNG"))
    assert info.value.code == "image_dimensions_too_large"
    assert f"{size[0]}x{size[1]}" in info.value.message
    assert "2048x2048" in info.value.message


def test_dimensions_at_limit_are_accepted():
    assert load_source_image(encode(Image.new("RGB", (2048, 8)), "PNG")).size == (2048, 8)


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


WIDE = {"max_width": 50_000, "max_height": 50_000}  # so the pixel checks, not the side checks, decide


@pytest.mark.parametrize(
    ("size", "limits", "pil_max"),
    [
        ((30000, 30000), ImageLimits(**WIDE, max_pixels=50_000**2), Image.MAX_IMAGE_PIXELS),  # Pillow's error
        (
            (10000, 10000),
            ImageLimits(**WIDE, max_pixels=50_000**2),
            Image.MAX_IMAGE_PIXELS,
        ),  # Pillow's warning
        ((30000, 30000), ImageLimits(**WIDE), None),  # Pillow's guard off: ours still holds
        ((3000, 3000), ImageLimits(max_width=4000, max_height=4000, max_pixels=1_000_000), None),
        ((30000, 30000), ImageLimits(), Image.MAX_IMAGE_PIXELS),  # default limits: the side check fires first
    ],
)
def test_decompression_bombs_rejected_from_header(size, limits, pil_max, monkeypatch, no_pixel_decoding):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_max)
    data = bomb_png(*size)
    assert len(data) < 10_000
    started = time.perf_counter()
    with pytest.raises(ImageDimensionsError) as info:
        load_source_image(data, limits)
    assert info.value.code == "image_dimensions_too_large"
    assert "pixels" in info.value.message
    assert time.perf_counter() - started < 0.5


def test_pillow_built_bomb_is_rejected(no_pixel_decoding):
    data = encode(Image.new("1", (8000, 8000)), "PNG")  # 64 MP in a few kB, under Pillow's own limit
    assert len(data) < 100_000
    with pytest.raises(ImageDimensionsError) as info:
        load_source_image(data, ImageLimits(**WIDE))
    assert "8000x8000 pixels (64000000 pixels)" in info.value.message


def test_image_limits_validate():
    with pytest.raises(ValueError, match="max_bytes"):
        ImageLimits(max_bytes=0)
    with pytest.raises(ValueError, match="max_width"):
        ImageLimits(max_width=True)


# --- orientation and modes ---------------------------------------------------------------------------


def test_exif_orientation_is_applied():
    source = load_source_image(exif_jpeg((300, 100), 6))  # rotate 90 degrees clockwise to display
    assert source.size == (100, 300)
    assert close(pixel(source, (95, 5)), (255, 0, 0), tolerance=40)  # top-left moved to top-right


def test_dimension_limit_applies_to_oriented_image():
    limits = ImageLimits(max_width=500, max_height=1000)
    assert load_source_image(exif_jpeg((800, 100), 6), limits).size == (100, 800)
    with pytest.raises(ImageDimensionsError) as info:
        load_source_image(exif_jpeg((100, 800), 6), limits)
    assert "800x100" in info.value.message


MODE_CASES = {
    # name: (image, format, {pixel: expected RGB})
    "P": (palette_image(False), "PNG", {(0, 0): (0, 0, 0), (1, 1): (255, 0, 0)}),
    "P+transparency": (palette_image(True), "PNG", {(0, 0): (255, 255, 255), (1, 1): (255, 0, 0)}),
    "L": (Image.new("L", (4, 4), 100), "PNG", {(0, 0): (100, 100, 100)}),
    "1": (Image.new("1", (4, 4), 1), "PNG", {(0, 0): (255, 255, 255)}),
    "L-jpeg": (Image.new("L", (8, 8), 100), "JPEG", {(0, 0): (100, 100, 100)}),
    "LA": (Image.new("LA", (4, 4), (100, 255)), "PNG", {(0, 0): (100, 100, 100)}),
    "LA-transparent": (Image.new("LA", (4, 4), (0, 0)), "PNG", {(0, 0): (255, 255, 255)}),
    "RGBA-half": (Image.new("RGBA", (4, 4), (0, 0, 0, 128)), "PNG", {(0, 0): (127, 127, 127)}),
    "RGBA-webp": (Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "WEBP", {(0, 0): (255, 255, 255)}),
    "RGB-tRNS": (
        Image.new("RGB", (4, 4), (10, 20, 30)),
        "PNG",
        {(0, 0): (255, 255, 255)},
    ),
    "CMYK": (Image.new("CMYK", (8, 8), (255, 0, 0, 0)), "JPEG", {(0, 0): (0, 255, 255)}),
    "I;16": (
        sixteen_bit([0, 32768, 65535, 257 * 100]),
        "PNG",
        {(0, 0): (0, 0, 0), (1, 0): (128, 128, 128), (2, 0): (255, 255, 255), (3, 0): (100, 100, 100)},
    ),
}


@pytest.mark.parametrize("name", MODE_CASES)
def test_modes_convert_to_8bit_rgb(name):
    image, fmt, expected = MODE_CASES[name]
    params = {"transparency": (10, 20, 30)} if name == "RGB-tRNS" else {}
    if fmt == "WEBP":
        params["lossless"] = True
    source = load_source_image(encode(image, fmt, **params))
    assert source.image.mode == "RGB"
    for xy, rgb in expected.items():
        assert close(pixel(source, xy), rgb), (xy, pixel(source, xy), rgb)


@pytest.mark.parametrize("mode", ["I", "I;16", "I;16B", "PA", "La", "RGBa", "YCbCr", "HSV", "F"])
def test_to_rgb_handles_in_memory_modes(mode):
    assert to_rgb(Image.new(mode, (2, 2))).mode == "RGB"


def test_sixteen_bit_modes_scale_not_clip():
    for mode in ("I", "I;16"):
        image = sixteen_bit([32768]).convert(mode)
        assert close(to_rgb(image).getpixel((0, 0)), (128, 128, 128), tolerance=1)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_images_yield_first_frame(fmt):
    data = animated(fmt)
    with Image.open(io.BytesIO(data)) as check:
        assert getattr(check, "n_frames", 1) == 3
    source = load_source_image(data)
    assert (source.format, source.size) == (fmt.lower(), (16, 16))
    assert close(pixel(source, (8, 8)), (255, 0, 0))


# --- encoding ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mime", "ext"),
    [("png", "image/png", "png"), ("jpeg", "image/jpeg", "jpg"), ("webp", "image/webp", "webp")],
)
def test_encode_round_trip(fmt, mime, ext):
    image = Image.new("RGB", (40, 24), (200, 50, 25))
    image.paste((10, 220, 90), (0, 0, 20, 24))
    data = encode_image(image, fmt)
    assert (content_type(fmt), file_extension(fmt)) == (mime, ext)
    source = load_source_image(data)
    assert (source.format, source.size) == (fmt, (40, 24))
    assert close(pixel(source, (5, 5)), (10, 220, 90), tolerance=0 if fmt == "png" else 8)
    assert close(pixel(source, (35, 5)), (200, 50, 25), tolerance=0 if fmt == "png" else 8)


def test_encode_quality_and_case():
    image = noise(128, 128)
    assert len(encode_image(image, "JPEG", quality=20)) < len(encode_image(image, "jpeg", quality=95))
    assert load_source_image(encode_image(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "jpeg")).size == (8, 8)


@pytest.mark.parametrize("call", [encode_image, content_type, file_extension])
@pytest.mark.parametrize("fmt", ["gif", "jpg2", "", None])
def test_unknown_output_format(call, fmt):
    args = (Image.new("RGB", (8, 8)), fmt) if call is encode_image else (fmt,)
    with pytest.raises(InvalidInputError) as info:
        call(*args)
    assert (info.value.param, info.value.code) == ("output_format", "invalid_request")


@pytest.mark.parametrize("quality", [0, 101, 9.5, True])
def test_bad_quality(quality):
    with pytest.raises(InvalidInputError):
        encode_image(Image.new("RGB", (8, 8)), "jpeg", quality=quality)


# --- output size -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "requested", "max_side", "expected"),
    [
        ((512, 512), (0, 0), 2048, (512, 512)),
        ((1023, 1020), (0, 0), 2048, (1024, 1024)),
        ((1019, 1028), (0, 0), 2048, (1016, 1032)),  # 1019 rounds down; 1028 is a tie and goes up
        ((3, 700), (0, 0), 2048, (8, 704)),  # never below 8
        ((640, 480), (1019, 1020), 2048, (1016, 1024)),
        ((1000, 500), (0, 512), 2048, (1024, 512)),  # one side given: keep the source aspect ratio
        ((1000, 500), (300, 0), 2048, (304, 152)),  # 150 -> 152
        ((333, 1000), (0, 100), 2048, (32, 104)),  # 33.3 -> 32, 100 -> 104 (tie up)
        ((4000, 3000), (0, 0), 1024, (1024, 768)),  # bound: longer side = max_side
        ((640, 480), (3000, 1000), 1024, (1024, 336)),  # 341.3 rounds down to 336
        ((640, 480), (100, 5000), 1000, (16, 1000)),  # max_side itself not a multiple of 8 -> 1000
        ((640, 480), (100, 5000), 1020, (16, 1016)),
        ((10, 10000), (0, 0), 512, (8, 512)),  # the short side never drops below 8
    ],
)
def test_output_size(source, requested, max_side, expected):
    w, h = output_size(*source, *requested, max_side)
    assert (w, h) == expected
    assert w % 8 == 0
    assert h % 8 == 0
    assert max(w, h) <= max_side


@pytest.mark.parametrize(
    ("width", "height", "param"),
    [
        (-8, 512, "width"),
        (512, -1, "height"),
        (512.0, 512, "width"),
        (512, "512", "height"),
        (True, 512, "width"),
        (None, 512, "width"),
    ],
)
def test_output_size_rejects_bad_requests(width, height, param):
    with pytest.raises(InvalidInputError) as info:
        output_size(640, 480, width, height, 2048)
    assert info.value.param == param


def test_prepare_source_resizes_with_lanczos_or_returns_same_image():
    source = load_source_image(encode(noise(64, 48), "PNG"))
    assert prepare_source(source, (64, 48)) is source.image
    resized = prepare_source(source, output_size(64, 48, 128, 0, 2048))
    assert (resized.size, resized.mode) == ((128, 96), "RGB")


# --- error plumbing and imports ----------------------------------------------------------------------


def test_errors_carry_codes_and_param():
    with pytest.raises(InvalidImageError) as info:
        load_source_image(b"GIF89a")
    assert (info.value.code, info.value.param) == ("invalid_image", "image")
    assert isinstance(info.value, InvalidInputError)


def test_module_does_not_import_torch():
    code = "import sys, inference.images; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_transformer_families_get_sides_in_multiples_of_16():
    """FLUX packs and SD3 patchifies 2x2 latents: a 72-px side becomes 80 there, 72 elsewhere."""
    from inference.models import Family, ModelSpec

    flux = ModelSpec(id="f", family=Family.FLUX, source="org/f")
    sd = ModelSpec(id="s", family=Family.SD, source="org/s")
    assert (flux.size_multiple, sd.size_multiple) == (16, 8)
    assert output_size(72, 72, 0, 0, 2048, flux.size_multiple) == (80, 80)
    assert output_size(72, 72, 0, 0, 2048, sd.size_multiple) == (72, 72)
    assert output_size(3000, 1000, 0, 0, 1440, 16) == (1440, 480)
