"""Test images built in memory with Pillow: odd modes, animations, EXIF rotation, bombs, corruption.

Shared by the decoder's unit tests (tests/unit/test_images.py), the HTTP-level image fuzzing
(tests/unit/test_images_http.py) and the real-stack run (tests/integration/test_image_fuzz_stack.py),
so every layer is tried with the same catalogue.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def noise(width: int = 64, height: int = 48, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(Image.new(mode, (1, 1)).getbands())
    shape = (height, width, channels) if channels > 1 else (height, width)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG whose header claims huge dimensions; the IDAT holds only the first rows.

    A real all-black bomb of this size compresses to ~0.1% of its pixels too, but building it takes
    seconds; the decoder must never get far enough to notice the missing rows.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(bytes((1 + (width + 7) // 8) * 16), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
    )


def exif_jpeg(size: tuple[int, int], orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # marker in the top-left corner of the stored pixels
    return encode(image, "JPEG", exif=exif.tobytes())


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    if transparent:
        image.info["transparency"] = 0
    return image


def sixteen_bit(values: list[int]) -> Image.Image:
    return Image.fromarray(np.array([values], dtype=np.uint16))


def animated(fmt: str, size: tuple[int, int] = (16, 16)) -> bytes:
    """Three frames (red, green, blue); the service must use the first."""
    frames = [Image.new("RGB", size, colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    return encode(
        frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True
    )


def corrupt_png() -> bytes:
    """Framing intact (signature, chunks, IEND) but the compressed pixel stream is broken."""
    png = bytearray(encode(noise(128, 128), "PNG"))
    png[len(png) // 3 : len(png) // 3 + 200] = bytes(200)
    return bytes(png)


def corrupt_jpeg() -> bytes:
    """A Huffman table whose code counts overflow: a fatal libjpeg error, not a warning."""
    jpeg = bytearray(encode(noise(128, 128), "JPEG"))
    table = jpeg.find(b"\xff\xc4")
    jpeg[table + 5 : table + 21] = b"\xff" * 16
    return bytes(jpeg)


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment of a JPEG; a scan runs to the next real marker."""
    pos, found = 2, []
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            found.append((marker, pos, pos + 2))
            return found
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:  # entropy-coded data: skip stuffed bytes (FF 00) and restart markers
            end = data.index(b"\xff", end)
            while data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end = data.index(b"\xff", end + 2)
        found.append((marker, pos, end))
        pos = end
    raise ValueError("no end-of-image marker")


def repeat_last_scan(jpeg: bytes, repeats: int) -> bytes:
    """The JPEG with its last scan (SOS header and data) repeated ``repeats`` more times before EOI."""
    segments = jpeg_segments(jpeg)
    _, start, end = [s for s in segments if s[0] == 0xDA][-1]
    return jpeg[:end] + jpeg[start:end] * repeats + jpeg[end:]


def jpeg_scan_bomb(size: int = 2048, repeats: int = 3000) -> bytes:
    """Security review finding 1: a flat 2048x2048 progressive JPEG whose last scan (16 bytes: an AC
    refinement of the luma, all zeros) is repeated 3,000 times. 71 KB; Pillow decodes it (every scan
    revisits all 65,536 luma blocks) in ~8 s of CPU on this project's machine (the review measured ~59 s)."""
    flat = encode(Image.new("RGB", (size, size), (128, 128, 128)), "JPEG", progressive=True, quality=90)
    return repeat_last_scan(flat, repeats)


def png_chunk_flood(chunks: int = 10_001) -> bytes:
    """A valid 8x8 PNG with ``chunks`` empty private chunks after IHDR (Pillow reads each in Python)."""
    png = encode(Image.new("RGB", (8, 8)), "PNG")
    header_end = 8 + 25  # signature + IHDR
    return png[:header_end] + png_chunk(b"prVt", b"") * chunks + png[header_end:]


def truncated(fmt: str) -> bytes:
    data = encode(noise(128, 128), fmt)
    return data[: len(data) // 2]


#: Images the service must accept: name → (bytes, the source size after EXIF orientation).
ACCEPTED: dict[str, tuple[bytes, tuple[int, int]]] = {
    "cmyk-jpeg": (encode(Image.new("CMYK", (40, 32), (255, 0, 0, 0)), "JPEG"), (40, 32)),
    "16-bit-png": (encode(Image.fromarray(np.full((32, 40), 40000, dtype=np.uint16)), "PNG"), (40, 32)),
    "rgba-png": (encode(Image.new("RGBA", (40, 32), (0, 0, 0, 128)), "PNG"), (40, 32)),
    "rgba-webp": (encode(Image.new("RGBA", (40, 32), (255, 0, 0, 0)), "WEBP", lossless=True), (40, 32)),
    "la-png": (encode(Image.new("LA", (40, 32), (100, 255)), "PNG"), (40, 32)),
    "palette-transparent-png": (encode(palette_image(True), "PNG"), (8, 8)),
    "1-bit-png": (encode(Image.new("1", (40, 32), 1), "PNG"), (40, 32)),
    "grayscale-jpeg": (encode(Image.new("L", (40, 32), 100), "JPEG"), (40, 32)),
    "exif-rotated-jpeg": (exif_jpeg((48, 24), 6), (24, 48)),
    "animated-png": (animated("PNG", (40, 32)), (40, 32)),
    "animated-webp": (animated("WEBP", (40, 32)), (40, 32)),
    "progressive-jpeg": (encode(noise(40, 32), "JPEG", progressive=True), (40, 32)),
    "jpeg-with-trailer": (encode(noise(40, 32), "JPEG") + b"SEFT-vendor-trailer", (40, 32)),
}

#: Images the service must refuse with a 4xx: name → (bytes, the HTTP status).
REFUSED: dict[str, tuple[bytes, int]] = {
    "truncated-png": (truncated("PNG"), 400),
    "truncated-jpeg": (truncated("JPEG"), 400),
    "truncated-webp": (truncated("WEBP"), 400),
    "corrupt-png": (corrupt_png(), 400),
    "corrupt-jpeg": (corrupt_jpeg(), 400),
    "gif": (encode(noise(mode="P"), "GIF"), 400),
    "tiff": (encode(noise(), "TIFF"), 400),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 400),
    "garbage": (np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), 400),
    "empty": (b"", 400),
    "huge-dimensions": (encode(Image.new("1", (4096, 64)), "PNG"), 400),
    "decompression-bomb": (bomb_png(30000, 30000), 400),
    "pillow-built-bomb": (encode(Image.new("1", (8000, 8000)), "PNG"), 400),
    "jpeg-scan-bomb": (jpeg_scan_bomb(), 400),
    "png-chunk-flood": (png_chunk_flood(), 400),
}
