"""Decode, validate, normalise and encode images at the service boundary.

Source images arrive from untrusted callers, so everything here assumes hostile input:

* The format is judged from the magic bytes, never from a file name or a declared MIME type, and only
  JPEG, PNG and WebP are accepted (every other Pillow plugin is attack surface we do not need).
* Sizes are checked before work that scales with them: the byte length before base64-decoding (estimated
  from the base64 length), the pixel count from the lazily read header before any pixel is decoded
  (decompression bombs), so a hostile request costs us a few kilobytes of header parsing at most.
* Decode *time* is bounded too, not only memory: it is not proportional to bytes (a 71 KB progressive
  JPEG repeating its last scan 3,000 times costs ~59 s of CPU to decode). The structure walk counts
  JPEG scans and the samples they code, and JPEG marker segments and PNG chunks (Pillow handles each
  in Python), and refuses absurd counts before Pillow sees the file. With the byte and pixel limits,
  that bounds the decode of every accepted format (measured worst cases: RELIABILITY.md).
* ``inspect_source_image`` does every check that costs no pixel decoding; ``decode_source_image``
  does the expensive part. The serving layer admits a request (rate and concurrency limits) between
  the two, so a hostile image costs its tenant quota before it costs us CPU.
* Truncated files are rejected by our own structural check as well as by Pillow, so the result does not
  depend on ``ImageFile.LOAD_TRUNCATED_IMAGES``, a process-wide flag that any imported library may flip.
* Every accepted image leaves as 8-bit RGB in its EXIF orientation, the one shape the pipelines take.

This module must stay torch-free: the API process imports it to validate requests without loading models.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageOps

from inference.errors import ImageDimensionsError, ImageTooLargeError, InvalidImageError, InvalidInputError

MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_IMAGE_WIDTH = 2048
MAX_IMAGE_HEIGHT = 2048
MAX_IMAGE_PIXELS = MAX_IMAGE_WIDTH * MAX_IMAGE_HEIGHT
#: The longest output side any API accepts (the REST spec: "Maximum resolution: 2048x2048 pixels");
#: a deployment may lower it (AppArgs.max_side), a model too (ModelSpec.max_side).
MAX_OUTPUT_SIDE = 2048
SIZE_MULTIPLE = 8  # latent diffusion models downsample by 8; other sizes would be cropped or fail.
#: Scans in one JPEG. libjpeg's progressive script has 10 (6 for grayscale); encoders that optimise
#: the script (mozjpeg) stay around 10-20. A scan bomb repeats a scan thousands of times.
MAX_JPEG_SCANS = 64
#: Samples all scans of one JPEG may code together, in full frames of the largest allowed image: each
#: scan revisits every block of its components. A 4:2:0 progressive JPEG of libjpeg codes ~8 frames,
#: a 4:4:4 one ~14; 32 frames of 2048x2048 decode in about a second here (RELIABILITY.md).
JPEG_SCAN_FRAMES = 32
#: JPEG marker segments / PNG chunks in one file: Pillow walks both in Python (~2 us per chunk), so
#: 10 MB of empty chunks would cost seconds before a pixel is decoded. Real files have tens to a few
#: thousand (8 KB IDAT chunks of a 10 MB PNG: 1,280).
MAX_SEGMENTS = 10_000
DEFAULT_QUALITY = 90

ACCEPTED_FORMATS = ("jpeg", "png", "webp")
OUTPUT_FORMATS = ("png", "jpeg", "webp")
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
_CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# "data:" then the media type and parameters (bounded, so a comma-less 100 MB string is not scanned).
_DATA_URL_HEAD = re.compile(r"\s*data:([^,]{0,256}),", re.IGNORECASE)

# Pillow's plugins raise any of these on malformed input; all of them mean "bad image", not "our bug".
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)


@dataclass(frozen=True)
class ImageLimits:
    """What a source image may weigh: encoded bytes, oriented width and height, and decoded pixels.

    ``max_pixels`` is the decompression-bomb guard, checked against the header before decoding. Pillow's
    own ``Image.MAX_IMAGE_PIXELS`` (about 89 MP) stays in force as an outer bound, so a ``max_pixels``
    above it has no effect. ``max_jpeg_scans``, ``max_jpeg_scan_samples`` and ``max_segments`` bound
    the decode time (scan bombs, chunk floods); see the module docstring.
    """

    max_bytes: int = MAX_IMAGE_BYTES
    max_width: int = MAX_IMAGE_WIDTH
    max_height: int = MAX_IMAGE_HEIGHT
    max_pixels: int = MAX_IMAGE_PIXELS
    max_jpeg_scans: int = MAX_JPEG_SCANS
    max_jpeg_scan_samples: int = JPEG_SCAN_FRAMES * MAX_IMAGE_PIXELS
    max_segments: int = MAX_SEGMENTS

    def __post_init__(self) -> None:
        for name in (
            "max_bytes",
            "max_width",
            "max_height",
            "max_pixels",
            "max_jpeg_scans",
            "max_jpeg_scan_samples",
            "max_segments",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ImageLimits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class SourceImage:
    """A validated source image: 8-bit RGB, EXIF orientation applied, first frame if it was animated.

    ``format`` is the sniffed format ("jpeg", "png" or "webp"), ``byte_size`` the encoded length.
    """

    image: Image.Image
    format: str
    width: int
    height: int
    byte_size: int

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)


def _accepted_list() -> str:
    return ", ".join(f.upper() for f in ACCEPTED_FORMATS)


def _too_large(size: int, max_bytes: int, *, estimated: bool = False) -> ImageTooLargeError:
    what = "is about" if estimated else "is"
    return ImageTooLargeError(
        f"Image {what} {size} bytes; the maximum is {max_bytes} bytes ({max_bytes / 2**20:g} MiB).",
        param="image",
        value=size,
    )


def decode_data_url(text: str, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """Return the bytes of a ``data:<mime>;base64,<payload>`` URL, refusing oversized ones unread.

    Only data URLs are accepted, not bare base64: an explicit prefix makes the contract unambiguous (a
    plain URL or a file path is never mistaken for base64) and gives a clear error for either mistake.
    The declared MIME type is ignored because the content is sniffed later; line breaks in the payload
    (``base64`` CLI output) and missing ``=`` padding are tolerated. The decoded size is computed from the
    payload length first, so a 100 MB string is refused without decoding it.
    """
    if not isinstance(text, str):
        raise InvalidImageError("Image must be a data URL string.", param="image")
    match = _DATA_URL_HEAD.match(text)
    if match is None:
        raise InvalidImageError(
            "Image must be a data URL of the form 'data:image/<type>;base64,<payload>'.",
            param="image",
            value=text[:32],
        )
    if "base64" not in (p.strip().lower() for p in match.group(1).split(";")[1:]):
        raise InvalidImageError(
            "Image data URL must be base64-encoded: 'data:image/<type>;base64,<payload>'.",
            param="image",
            value=text[:32],
        )
    # Refuse from the length alone, before copying or scanning the payload; allow ~3% slack for MIME
    # line breaks (CRLF per 76 chars). The exact check follows once whitespace is gone.
    estimated = (len(text) - match.end()) * 3 // 4
    if estimated > max_bytes + max_bytes // 32 + 3:
        raise _too_large(estimated, max_bytes, estimated=True)
    payload = text[match.end() :]
    compact = "".join(payload.split())
    compact += "=" * (-len(compact) % 4)
    decoded_size = len(compact) * 3 // 4 - (len(compact) - len(compact.rstrip("=")))
    if decoded_size > max_bytes:
        raise _too_large(decoded_size, max_bytes, estimated=True)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(
            "Image data URL payload is not valid base64.", param="image", details=str(exc)
        ) from None


def sniff_format(data: bytes) -> str | None:
    """The accepted format the magic bytes announce ("jpeg", "png", "webp"), or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_MAGIC:
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


#: In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte), 0xD0-0xD7 (a restart marker) or
#: 0xFF (fill); anything else starts the next marker. One pattern, no repetition: linear, in C.
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
#: Start-of-frame markers (0xC4 DHT, 0xC8 JPG and 0xCC DAC share the range but are not frames).
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _corrupt(fmt: str) -> InvalidImageError:
    return InvalidImageError(f"The {fmt.upper()} image is truncated or corrupt.", param="image")


def _too_complex(what: str, count: int, limit: int) -> InvalidImageError:
    return InvalidImageError(
        f"The image has {what} {count} (at most {limit} are accepted); re-encode it with a standard encoder.",
        param="image",
        value=count,
    )


def _frame_samples(body: bytes) -> dict[int, int]:
    """Component id → its sample count, from a start-of-frame segment (sampling factors applied)."""
    if len(body) < 6:
        raise _corrupt("jpeg")
    height, width, count = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
    specs = [body[6 + 3 * i : 9 + 3 * i] for i in range(count)]
    if width == 0 or height == 0 or count == 0 or any(len(spec) < 3 for spec in specs):
        raise _corrupt("jpeg")  # a height defined later by DNL is not supported by libjpeg either
    factors = [(spec[1] >> 4, spec[1] & 0x0F) for spec in specs]
    if any(h == 0 or v == 0 for h, v in factors):
        raise _corrupt("jpeg")
    h_max, v_max = max(h for h, _ in factors), max(v for _, v in factors)
    return {
        spec[0]: -(-width * h // h_max) * -(-height * v // v_max)
        for spec, (h, v) in zip(specs, factors, strict=True)
    }


def _walk_jpeg(data: bytes, limits: ImageLimits) -> None:
    """Walk the markers to the end-of-image marker, refusing truncated files and absurd structure.

    Markers are walked rather than searched so the EOI of an embedded EXIF thumbnail (inside APP1, before
    the main scan) does not count; trailers after EOI (some phones append data) are fine. Each scan
    (SOS) is counted, and so are the samples it codes: libjpeg revisits every block of a scan's
    components per scan, so a scan bomb (one cheap scan repeated thousands of times) costs CPU in
    proportion to scans x pixels while its file stays tiny. The walk stops at the first limit it
    passes, so it costs O(limits), not O(file).
    """
    components: dict[int, int] = {}
    scans = samples = segments = 0
    pos = 2
    while True:
        if pos + 2 > len(data) or data[pos] != 0xFF:
            raise _corrupt("jpeg")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # end of image
            if scans == 0:
                raise _corrupt("jpeg")
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers carry no length
            pos += 2
            continue
        segments += 1
        if segments > limits.max_segments:
            raise _too_complex("marker segments:", segments, limits.max_segments)
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        end = pos + 2 + length
        if length < 2 or end > len(data):
            raise _corrupt("jpeg")
        body = data[pos + 4 : end]
        if marker in _JPEG_FRAMES:
            if components:  # libjpeg refuses a second frame header as well
                raise _corrupt("jpeg")
            components = _frame_samples(body)
        elif marker == 0xDA:  # start of scan: entropy-coded data follows, up to the next marker
            if not components or not body:
                raise _corrupt("jpeg")
            scans += 1
            if scans > limits.max_jpeg_scans:
                raise _too_complex("JPEG scans:", scans, limits.max_jpeg_scans)
            samples += sum(components.get(selector, 0) for selector in body[1 : 1 + 2 * body[0] : 2])
            if samples > limits.max_jpeg_scan_samples:
                raise InvalidImageError(
                    f"The JPEG's {scans} scans code {samples} samples, more than the "
                    f"{limits.max_jpeg_scan_samples} accepted (a scan bomb?); re-encode it with a standard "
                    "encoder.",
                    param="image",
                    value=scans,
                )
            following = _JPEG_NEXT_MARKER.search(data, end)
            if following is None:
                raise _corrupt("jpeg")
            pos = following.start()
            continue
        pos = end


def _walk_png(data: bytes, limits: ImageLimits) -> None:
    """Walk the chunks to IEND, refusing truncated framing and chunk floods (Pillow reads each chunk
    in Python: 800,000 empty chunks in 10 MB cost ~2 s before any pixel)."""
    pos, chunks = len(_PNG_MAGIC), 0
    while pos + 12 <= len(data):
        chunks += 1
        if chunks > limits.max_segments:
            raise _too_complex("PNG chunks:", chunks, limits.max_segments)
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        pos += 12 + length
        if kind == b"IEND":
            if pos <= len(data):
                return
            break
    raise _corrupt("png")


def _check_structure(data: bytes, fmt: str, limits: ImageLimits) -> None:
    """Complete (independent of LOAD_TRUNCATED_IMAGES) and not built to make the decoder spin."""
    if fmt == "png":
        _walk_png(data, limits)
    elif fmt == "webp":  # one RIFF chunk; libwebp parses the frames inside it in C
        if len(data) < 8 + int.from_bytes(data[4:8], "little"):
            raise _corrupt("webp")
    else:
        _walk_jpeg(data, limits)


def _check_dimensions(width: int, height: int, limits: ImageLimits) -> None:
    if width > limits.max_width or height > limits.max_height:
        raise ImageDimensionsError(
            f"Image is {width}x{height} pixels; the maximum is {limits.max_width}x{limits.max_height}.",
            param="image",
            value=(width, height),
        )


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite over white: the models take RGB, and white is what most viewers show behind transparency."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded mode to 8-bit RGB.

    16-bit grayscale is scaled (value / 256) because Pillow's own ``convert("L")`` clips it, turning every
    mid-gray into white. Palette, LA/PA/RGBA and tRNS-keyed images are composited over white. Embedded
    ICC profiles are not applied: pixel values are taken as sRGB, as the models were trained on.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode == "I" or mode.startswith("I;16"):
        return image.convert("I").point(lambda v: v / 256).convert("L").convert("RGB")
    if mode in ("La", "RGBa"):  # premultiplied alpha: Pillow converts these only to their straight forms
        image = image.convert(mode.upper())
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return _flatten_alpha(image)
    if mode == "P" and image.palette is not None and image.palette.mode == "RGBA":
        return _flatten_alpha(image)
    return image.convert("RGB")


@dataclass(frozen=True)
class ImageHeader:
    """What ``inspect_source_image`` learnt without decoding a pixel: the sniffed format and the stored
    size (before EXIF orientation)."""

    format: str
    width: int
    height: int
    byte_size: int


def _as_bytes(data: object) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImageError("Image must be bytes.", param="image")
    return bytes(data)


@contextlib.contextmanager
def _opened(data: bytes, fmt: str) -> Iterator[Image.Image]:
    """Pillow's lazy open, with Pillow's and every decoder's errors turned into ours."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we want a refusal either way.
            # catch_warnings is process-global before Python 3.14; a racing thread at worst also sees
            # this warning as an error, which is the policy we want everywhere anyway.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as opened:
                yield opened
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDimensionsError(
            f"Image has too many pixels to decode safely: {exc}", param="image"
        ) from None
    except InvalidInputError:
        raise
    except _DECODE_ERRORS as exc:
        raise InvalidImageError(
            f"The {fmt.upper()} image could not be decoded; it may be corrupt or truncated.",
            param="image",
            details=f"{type(exc).__name__}: {exc}",
        ) from None


def inspect_source_image(data: bytes, limits: ImageLimits | None = None) -> ImageHeader:
    """Every check that decodes no pixel: byte length, magic bytes, structure (complete, scan and
    chunk counts), then the header's dimensions and pixel count (decompression bombs).

    Cheap by construction (it stops at the first limit it passes), so the serving layer runs it before
    admitting a request and ``decode_source_image`` after.
    """
    limits = limits or ImageLimits()
    data = _as_bytes(data)
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits.max_bytes)
    fmt = sniff_format(data)
    if fmt is None:
        raise InvalidImageError(
            f"Unsupported or unrecognised image format; accepted formats are {_accepted_list()}.",
            param="image",
        )
    _check_structure(data, fmt, limits)
    with _opened(data, fmt) as opened:
        width, height = opened.size
    # Orientation is unknown until EXIF is read (which decodes PNGs), so allow either way here; the
    # oriented size is checked exactly after decoding.
    if not (width <= limits.max_width and height <= limits.max_height) and not (
        height <= limits.max_width and width <= limits.max_height
    ):
        _check_dimensions(width, height, limits)
    if width * height > limits.max_pixels:  # bomb guard, from the lazily read header
        raise ImageDimensionsError(
            f"Image is {width}x{height} pixels ({width * height} pixels); the maximum is "
            f"{limits.max_pixels} pixels.",
            param="image",
            value=(width, height),
        )
    return ImageHeader(format=fmt, width=width, height=height, byte_size=len(data))


def decode_source_image(data: bytes, header: ImageHeader, limits: ImageLimits | None = None) -> SourceImage:
    """Decode bytes that ``inspect_source_image`` passed (``header`` is its answer) into 8-bit RGB.

    Animated WebP/APNG yield their first frame, which is what a still-image model can use. The
    width/height limits apply to the EXIF-oriented image.
    """
    limits = limits or ImageLimits()
    data = _as_bytes(data)
    with _opened(data, header.format) as opened:
        if opened.size != (header.width, header.height):  # not the bytes that were inspected
            raise InvalidImageError("The image changed between inspection and decoding.", param="image")
        opened.seek(0)
        opened.load()
        image = to_rgb(ImageOps.exif_transpose(opened))
    _check_dimensions(image.width, image.height, limits)
    return SourceImage(
        image=image, format=header.format, width=image.width, height=image.height, byte_size=len(data)
    )


def load_source_image(data: bytes, limits: ImageLimits | None = None) -> SourceImage:
    """Validate and decode an untrusted source image into an 8-bit RGB ``SourceImage``.

    ``inspect_source_image`` (cheapest checks first, no pixel decoded) then ``decode_source_image``.
    """
    limits = limits or ImageLimits()
    data = _as_bytes(data)
    return decode_source_image(data, inspect_source_image(data, limits), limits)


def _output_format(fmt: str) -> str:
    name = fmt.lower() if isinstance(fmt, str) else fmt
    if name not in OUTPUT_FORMATS:
        raise InvalidInputError(
            f"Unknown output format {fmt!r}; choose one of {', '.join(OUTPUT_FORMATS)}.",
            param="output_format",
            value=fmt,
        )
    return name


def encode_image(image: Image.Image, fmt: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """Encode an output image as "png", "jpeg" or "webp" (case-insensitive), without metadata.

    ``quality`` (1-100) applies to JPEG and lossy WebP; PNG is lossless and ignores it.
    """
    name = _output_format(fmt)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        raise InvalidInputError(
            f"Quality must be an integer from 1 to 100, got {quality!r}.", param="quality", value=quality
        )
    if image.mode not in ("RGB", "L"):
        image = to_rgb(image)
    buffer = io.BytesIO()
    if name == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif name == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="WEBP", quality=quality)
    return buffer.getvalue()


def content_type(fmt: str) -> str:
    """The MIME type for an output format, e.g. "image/png"."""
    return _CONTENT_TYPES[_output_format(fmt)]


def file_extension(fmt: str) -> str:
    """The conventional file extension, without the dot ("png", "jpg", "webp")."""
    return _EXTENSIONS[_output_format(fmt)]


def round_to_multiple(numerator: int, denominator: int = 1, multiple: int = SIZE_MULTIPLE) -> int:
    """Round numerator/denominator to the nearest multiple of ``multiple`` (8), ties up, never below it.

    Defined as ``max(8, floor((x + 4) / 8) * 8)`` in exact integer arithmetic (Python's ``round`` would
    round ties to even): 1019 -> 1016, 1020 -> 1024, 1023 -> 1024, 3 -> 8.
    """
    half = multiple // 2
    return max(multiple, (numerator + half * denominator) // (multiple * denominator) * multiple)


def _requested(value: object, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(
            f"{param} must be a non-negative integer (0 means the source size), got {value!r}.",
            param=param,
            value=value,
        )
    return value


def output_size(
    source_w: int, source_h: int, width: int, height: int, max_side: int, multiple: int = SIZE_MULTIPLE
) -> tuple[int, int]:
    """The (width, height) to generate at, a multiple of ``multiple`` (8; 16 for models whose
    transformer takes 2x2 latent patches) on both sides and at most ``max_side``.

    * width = height = 0: the source size. Exactly one 0: that side follows the source aspect ratio from
      the given side (computed exactly, then rounded). Otherwise the requested size, stretching if the
      aspect ratio differs.
    * Each side is rounded to the nearest multiple of 8, ties up, minimum 8 (see ``round_to_multiple``),
      because the VAE works on 8x8 blocks.
    * If a side then exceeds ``max_side``, both are scaled down proportionally so the longer side equals
      ``max_side``, and both are rounded DOWN to multiples of 8 (minimum 8) so the bound still holds.
    """
    width = _requested(width, "width")
    height = _requested(height, "height")
    if source_w <= 0 or source_h <= 0:
        raise ValueError(f"source size must be positive, got {source_w}x{source_h}")
    if max_side < multiple:
        raise ValueError(f"max_side must be at least {multiple}, got {max_side}")
    if width == 0 and height == 0:
        w, h = round_to_multiple(source_w, multiple=multiple), round_to_multiple(source_h, multiple=multiple)
    elif width == 0:
        w, h = (
            round_to_multiple(source_w * height, source_h, multiple),
            round_to_multiple(height, 1, multiple),
        )
    elif height == 0:
        w, h = round_to_multiple(width, 1, multiple), round_to_multiple(source_h * width, source_w, multiple)
    else:
        w, h = round_to_multiple(width, 1, multiple), round_to_multiple(height, 1, multiple)
    longer = max(w, h)
    if longer > max_side:
        w, h = (max(multiple, side * max_side // longer // multiple * multiple) for side in (w, h))
    return w, h


def prepare_source(source: SourceImage, size: tuple[int, int]) -> Image.Image:
    """The source resized to ``size`` with Lanczos (Pillow's sharpest filter); the same image if equal.

    The aspect ratio is not preserved: ``output_size`` already chose the size the caller asked for.
    """
    size = (int(size[0]), int(size[1]))
    if source.image.size == size:
        return source.image
    return source.image.resize(size, Image.Resampling.LANCZOS)
