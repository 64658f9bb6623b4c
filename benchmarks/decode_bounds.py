"""Decode cost of hostile and worst-case-legal source images: before and after (security round 2, finding 1).

Before: the ingress decoded whatever Pillow accepted, so a 71 KB progressive JPEG whose last scan is
repeated 3,000 times (``tests.support.image_samples.jpeg_scan_bomb``) cost seconds of CPU per request
and was then accepted. After: ``inference.images.inspect_source_image`` counts scans (and the samples
they code), JPEG marker segments and PNG chunks while walking the structure, and refuses before
Pillow decodes a pixel. What is still accepted is bounded by bytes (10 MiB), pixels (2048x2048),
scans (64), scan samples (32 frames) and segments (10,000); this script decodes the worst cases of
each accepted format we could build and prints their CPU time, so the bound is a measurement.

    PYTHONPATH=. .venv/bin/python benchmarks/decode_bounds.py            # everything (~1 min)
    PYTHONPATH=. .venv/bin/python benchmarks/decode_bounds.py --no-before  # skip the slow old decode
"""

from __future__ import annotations

import argparse
import io
import struct
import time

import numpy as np
from PIL import Image

from inference.errors import InvalidInputError
from inference.images import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_HEIGHT,
    MAX_IMAGE_WIDTH,
    ImageLimits,
    inspect_source_image,
    load_source_image,
)
from tests.support.image_samples import encode, jpeg_scan_bomb, jpeg_segments, png_chunk

SIDE = (MAX_IMAGE_WIDTH, MAX_IMAGE_HEIGHT)


def cpu(fn, repeat: int = 1) -> tuple[float, object]:
    """(best CPU seconds over ``repeat`` runs, the last result or the exception raised)."""
    best, outcome = float("inf"), None
    for _ in range(repeat):
        started = time.process_time()
        try:
            outcome = fn()
        except InvalidInputError as error:
            outcome = error
        best = min(best, time.process_time() - started)
    return best, outcome


def plain_pillow(data: bytes) -> Image.Image:
    """What the old path did with an image whose header passed: decode it, whatever its structure."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


def textured(size=SIDE, seed: int = 0) -> Image.Image:
    """Photo-like content: upscaled noise (compresses like a photo, unlike raw noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BICUBIC)


def noisy(size, seed: int = 1, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def max_scan_jpeg(base: bytes) -> tuple[bytes, str]:
    """The progressive JPEG ``base`` padded with repeats of its costliest scan up to the last repeat
    the walk still accepts (the scan and sample budgets): the worst such JPEG that is decoded."""
    scans = [(start, end) for marker, start, end in jpeg_segments(base) if marker == 0xDA]
    eoi = len(base) - 2
    worst, worst_cost, label = base, 0.0, ""
    for index, (start, end) in enumerate(scans):
        repeats = 0
        while True:  # the largest number of repeats of this scan that still passes
            candidate = base[:eoi] + base[start:end] * (repeats + 1) + base[eoi:]
            try:
                inspect_source_image(candidate)
            except InvalidInputError:
                break
            repeats += 1
        data = base[:eoi] + base[start:end] * repeats + base[eoi:]
        cost, _ = cpu(lambda data=data: load_source_image(data))
        if cost > worst_cost:
            worst, worst_cost = data, cost
            label = f"scan {index} repeated {repeats}x ({len(scans) + repeats} scans)"
    return worst, label


def chunked_png(data: bytes, chunks: int) -> bytes:
    """The PNG with its image data re-split into ``chunks`` IDAT chunks."""
    pos, idat, head, tail = 8, b"", b"", b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos : pos + 12 + length]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        elif idat:
            tail += chunk
        else:
            head += chunk
        pos += 12 + length
    step = -(-len(idat) // chunks)
    body = b"".join(png_chunk(b"IDAT", idat[i : i + step]) for i in range(0, len(idat), step))
    return data[:8] + head + body + tail


def under_limit(build, sizes) -> tuple[bytes, tuple[int, int]]:
    """The largest of ``sizes`` whose encoding fits the byte limit."""
    for size in sizes:
        data = build(size)
        if len(data) <= MAX_IMAGE_BYTES:
            return data, size
    raise ValueError("nothing fits")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-before", action="store_true", help="skip the old path's decode of the bomb")
    args = parser.parse_args(argv)

    bomb = jpeg_scan_bomb()
    print(f"scan bomb: {len(bomb)} bytes, 2048x2048, 3,010 scans")
    if not args.no_before:
        cost, _ = cpu(lambda: plain_pillow(bomb))
        print(f"  before (decoded, then accepted): {cost:.2f} s CPU")
    cost, outcome = cpu(lambda: load_source_image(bomb), repeat=20)
    print(f"  after (refused: {outcome.code}): {cost * 1e3:.2f} ms CPU  -- {outcome.message}")

    print("worst accepted cases (CPU of inspect + decode to 8-bit RGB, best of 3):")
    rows: list[tuple[str, bytes]] = []
    data, label = max_scan_jpeg(encode(textured(), "JPEG", progressive=True, quality=95))
    rows.append((f"JPEG progressive 2048x2048 photo-like at the scan budget: {label}", data))
    # half noise: Pillow's in-memory progressive encoder fails on pure noise ("Suspension not allowed")
    base = encode(
        Image.blend(textured(), noisy(SIDE), 0.5), "JPEG", progressive=True, quality=95, subsampling=0
    )
    size = SIDE
    data, label = max_scan_jpeg(base)
    rows.append((f"JPEG progressive {size[0]}x{size[1]} 4:4:4 half noise at the scan budget: {label}", data))
    data, size = under_limit(
        lambda s: encode(noisy(s), "JPEG", quality=100, subsampling=0),
        [(2048, h) for h in range(2048, 0, -128)],
    )
    rows.append((f"JPEG baseline {size[0]}x{size[1]} q100 4:4:4 noise", data))
    data, size = under_limit(
        lambda s: encode(noisy(s, mode="CMYK"), "JPEG", quality=98, subsampling=0),
        [(2048, h) for h in range(2048, 0, -128)],
    )
    rows.append((f"JPEG CMYK {size[0]}x{size[1]} noise ({len(data) >> 20} MiB)", data))
    data, size = under_limit(lambda s: encode(noisy(s), "PNG"), [(2048, h) for h in range(2048, 0, -64)])
    rows.append((f"PNG RGB {size[0]}x{size[1]} noise ({len(data) >> 20} MiB)", data))
    rgba = textured().convert("RGBA")
    rows.append(("PNG RGBA 2048x2048 photo-like", encode(rgba, "PNG")))
    rows.append(("PNG 2048x2048 in 9,990 IDAT chunks", chunked_png(encode(textured(), "PNG"), 9_990)))
    gray16 = np.random.default_rng(2).integers(0, 65536, (1024, 1024), dtype=np.uint16)
    big16 = Image.fromarray(gray16).resize(SIDE, Image.Resampling.NEAREST)
    rows.append(("PNG 16-bit gray 2048x2048", encode(big16, "PNG")))
    data, size = under_limit(
        lambda s: encode(noisy(s), "WEBP", lossless=True), [(2048, h) for h in range(2048, 0, -128)]
    )
    rows.append((f"WebP lossless {size[0]}x{size[1]} noise ({len(data) >> 20} MiB)", data))
    rows.append(("WebP lossy q100 2048x2048 noise", encode(noisy(SIDE), "WEBP", quality=100)))
    frames = [textured(seed=i) for i in range(3)]
    rows.append(
        (
            "WebP animated 2048x2048, 3 frames (first decoded)",
            encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], quality=90),
        )
    )
    for name, data in rows:
        cost, outcome = cpu(lambda data=data: load_source_image(data, ImageLimits()), repeat=3)
        verdict = "accepted" if not isinstance(outcome, InvalidInputError) else f"refused ({outcome.code})"
        print(f"  {name}: {len(data):,} bytes, {verdict}, {cost:.3f} s CPU")
    # A flood of chunks costs Pillow ~2 us each in Python; the walk refuses past 10,000.
    flood = encode(Image.new("RGB", (8, 8)), "PNG")
    flood = flood[:33] + png_chunk(b"prVt", b"") * 800_000 + flood[33:]
    cost, _ = cpu(lambda: plain_pillow(flood))
    print(f"PNG with 800,000 empty chunks ({len(flood):,} bytes): before {cost:.2f} s CPU", end="")
    cost, outcome = cpu(lambda: load_source_image(flood), repeat=5)
    print(f", after refused ({outcome.code}) in {cost * 1e3:.2f} ms CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
