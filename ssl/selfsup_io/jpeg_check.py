"""JPEGs whose compressed data ends early: found by libjpeg's own warning, on every read path.

A JPEG cut short and closed with an end-of-image marker (a partial download, a copy that failed
half-way and was "repaired", a header that claims more rows than were encoded) decodes without
any error: libjpeg warns "Corrupt JPEG data: premature end of data segment" and fills the missing
blocks with grey. PIL installs a message handler that drops every libjpeg warning (its decoder
never reads ``num_warnings``), and torchvision's ``decode_jpeg`` prints the warning on stderr and
returns the grey image, so neither reader can tell such a file from a good one.

libjpeg-turbo's TurboJPEG API can: ``simplejpeg.decode_jpeg(..., strict=True)`` turns the
warnings that mean missing or damaged entropy-coded data into a ``ValueError``. The check decodes
at libjpeg's smallest DCT scale (1/8) to grey, so it costs the Huffman decoding and little else:
measured against the loader's own work for two 224-px views (``selfsup.decode.decode_views``),
it adds about 16 % for a 500 x 375 photo and 50 % for a 2000 x 1500 one (2-core VM, 2026-12-07).
Warnings about harmless oddities (extraneous bytes before
a marker, an unknown JFIF revision) do not make a file corrupt; only those in :data:`CORRUPT`.
"""

from __future__ import annotations

JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
# libjpeg's warnings (jerror.h) that mean pixels were invented: JWRN_HIT_MARKER and
# JWRN_JPEG_EOF ("premature end ..."), JWRN_HUFF_BAD_CODE, JWRN_MUST_RESYNC ("found marker ...")
CORRUPT = ("premature end", "bad huffman code", "corrupt jpeg data: found marker")


class JpegEndsEarly(ValueError):
    """A JPEG whose compressed data is missing or damaged (libjpeg would fill it with grey)."""


def check_jpeg(data: bytes) -> None:
    """Raise :class:`JpegEndsEarly` if ``data`` is a JPEG whose entropy-coded data ends early or
    is damaged. Anything that is not a JPEG, or that TurboJPEG cannot parse at all, passes: the
    caller's own decoder accepts or refuses it as before."""
    if data[:2] != JPEG_SOI:
        return
    import simplejpeg

    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
    except Exception:  # not parseable here: the real decoder says what is wrong
        return
    if data.rstrip(b"\x00")[-2:] != JPEG_EOI:
        # only the end marker missing: libjpeg warns at the end even when every pixel is there
        # (PIL decodes such a file whole). With the marker added, data that really ends early
        # still hits it too soon and warns as above; PIL refuses it on its own as truncated
        data = data + JPEG_EOI
    try:
        simplejpeg.decode_jpeg(data, colorspace="CMYK" if colorspace in ("CMYK", "YCCK") else "GRAY",
                               fastdct=True, fastupsample=True, min_height=1, min_width=1,
                               min_factor=8, strict=True)
    except ValueError as e:
        message = " ".join(str(e).split())
        if any(word in message.lower() for word in CORRUPT):
            raise JpegEndsEarly(f"JPEG data ends early or is damaged ({message})") from None
