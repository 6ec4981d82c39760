"""Frame images: every encoding to the model's exact size, and every way an image is refused.

Measured decode times to 172x172 (`decode_image`, median of 7x50 calls, 2 vCPU Zen 4, other jobs
running; JPEGs from `encode_jpeg`, quality 90, 4:4:4):
  172x172 JPEG (10 kB):   0.19-0.29 ms (no resize needed)
  1280x720 JPEG (110 kB): 2.7-4.7 ms (DCT-scaled decode to 320x180: 2.2-3.6 ms, then resize 0.5-0.8 ms;
                          a full-size decode alone is 3.5 ms and swscale from 1280x720 another 4.3 ms)
  PNG 172x172: 0.8-1.1 ms; PNG 1280x720: 13-22 ms; rgb24 1280x720 (resize only): 4.3-7.3 ms
"""

from __future__ import annotations

import struct

import av
import numpy as np
import pytest

from schemas import Frame, MessageError
from worker.pipeline.codec import decode_image, encode_jpeg, resize


def _image(height: int, width: int) -> np.ndarray:
    """Smooth gradients and a square: compressible like a photo, asymmetric so flips would show."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([255 * x / width, 255 * y / height, 128 + 64 * np.sin(x / 9.0)], axis=-1)
    img[height // 4 : height // 2, width // 4 : width // 2] = (250, 20, 20)
    return img.astype(np.uint8)


def _png(image: np.ndarray, pix_fmt: str = "rgb24") -> bytes:
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = image.shape[1], image.shape[0], pix_fmt
    frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=pix_fmt)
    return b"".join(bytes(p) for p in [*ctx.encode(frame), *ctx.encode(None)])


def _frame(encoding: str, data: bytes, width: int | None = None, height: int | None = None) -> Frame:
    return Frame(camera="c", seq=0, encoding=encoding, width=width, height=height, data=data)  # type: ignore[arg-type]


def _reason(frame: Frame, size: tuple[int, int] = (172, 172), **kwargs: int) -> str:
    with pytest.raises(MessageError) as info:
        decode_image(frame, size, **kwargs)
    return info.value.reason


def _error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_jpeg_round_trip() -> None:
    img = _image(172, 172)
    data = encode_jpeg(img)
    assert data[:2] == b"\xff\xd8" and len(data) < img.nbytes / 4
    out = decode_image(_frame("jpeg", data, 172, 172), (172, 172))
    assert out.shape == (172, 172, 3) and out.dtype == np.uint8
    assert _error(out, img) < 2.0
    assert len(encode_jpeg(img, quality=30)) < len(data)


def test_large_jpeg_is_decoded_to_exactly_the_model_size() -> None:
    img = _image(720, 1280)
    out = decode_image(_frame("jpeg", encode_jpeg(img)), (172, 172))
    assert out.shape == (172, 172, 3)
    assert _error(out, resize(img, (172, 172))) < 4.0  # DCT-scaled then resized: close to a direct resize
    wide = decode_image(_frame("jpeg", encode_jpeg(img)), (100, 300))
    assert wide.shape == (100, 300, 3)


@pytest.mark.parametrize("pix_fmt", ["rgb24", "rgba", "gray", "rgb48be"])
def test_png_round_trip(pix_fmt: str) -> None:
    img = _image(48, 64)
    if pix_fmt == "gray":
        img = np.repeat(img[..., :1], 3, axis=-1)
    out = decode_image(_frame("png", _png(img, pix_fmt)), (48, 64))
    assert out.shape == (48, 64, 3)
    assert _error(out, img) < 0.5  # lossless, bar 16-bit rounding
    small = decode_image(_frame("png", _png(img, pix_fmt), 64, 48), (24, 32))
    assert small.shape == (24, 32, 3)


def test_rgb24_round_trip() -> None:
    img = _image(48, 64)
    out = decode_image(_frame("rgb24", img.tobytes(), 64, 48), (48, 64))
    assert np.array_equal(out, img) and out.flags.writeable
    scaled = decode_image(_frame("rgb24", img.tobytes(), 64, 48), (172, 172))
    assert scaled.shape == (172, 172, 3)
    assert _error(scaled, resize(img, (172, 172))) == 0.0


def test_undecodable() -> None:
    data = encode_jpeg(_image(172, 172))
    assert _reason(_frame("jpeg", data[: len(data) // 2])) == "undecodable"  # truncated
    assert _reason(_frame("jpeg", b"\xff\xd8\xff\xe0garbage")) == "undecodable"
    assert _reason(_frame("jpeg", _png(_image(8, 8)))) == "undecodable"  # a PNG sent as JPEG
    assert _reason(_frame("png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)) == "undecodable"
    assert _reason(_frame("png", data)) == "undecodable"
    png = bytearray(_png(_image(32, 32)))
    png[60:-12] = bytes(len(png) - 72)  # a valid header, then zeros where the pixels were
    assert _reason(_frame("png", bytes(png))) == "undecodable"


def test_wrong_size() -> None:
    img = _image(48, 64)
    assert _reason(_frame("rgb24", img.tobytes()[:-1], 64, 48)) == "wrong_size"
    assert _reason(_frame("rgb24", img.tobytes(), 60, 50)) == "wrong_size"
    assert _reason(_frame("jpeg", encode_jpeg(img), 64, 47)) == "wrong_size"
    assert _reason(_frame("png", _png(img), 63, 48)) == "wrong_size"
    assert decode_image(_frame("jpeg", encode_jpeg(img), width=64), (10, 10)).shape == (10, 10, 3)


def test_too_large_is_refused_before_decoding() -> None:
    img = _image(100, 100)
    assert _reason(_frame("jpeg", encode_jpeg(img)), max_pixels=9999) == "too_large"
    assert _reason(_frame("png", _png(img)), max_pixels=9999) == "too_large"
    assert _reason(_frame("rgb24", img.tobytes(), 100, 100), max_pixels=9999) == "too_large"
    assert decode_image(_frame("jpeg", encode_jpeg(img)), (8, 8), max_pixels=10_000).shape == (8, 8, 3)
    # Headers claiming 30000x30000 over pixels of 16x16: refused from the header (a decode would
    # have failed as undecodable, after allocating 2.7 GB).
    jpeg = bytearray(encode_jpeg(_image(16, 16)))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", 30000, 30000)
    png = bytearray(_png(_image(16, 16)))
    png[16:24] = struct.pack(">II", 30000, 30000)
    assert _reason(_frame("jpeg", bytes(jpeg))) == "too_large"
    assert _reason(_frame("png", bytes(png))) == "too_large"
