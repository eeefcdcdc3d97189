"""How a WebDataset sample names its image and its label: shared by the trainer's loader
(``selfsup``) and the evaluator (``selfsup_eval``), which otherwise never import each other.

Public shards come in several layouts (docs/formats.md); all of these are read as they come:

* the image is the member whose extension's last dot-component is ``jpg``, ``jpeg``, ``png`` or
  ``webp`` (also ``ppm``, ``bmp``, ``tif``...). webdataset splits a member name at the first dot
  of its base name, so ``n01440764_10026.crop.jpg`` becomes key ``n01440764_10026`` with member
  ``crop.jpg``; matching on the last component finds it, as webdataset's own decoders do;
* the label is ``cls`` (decimal ASCII), else an integer field ``label`` / ``cls`` / ``class`` /
  ``target`` of a ``json`` member, else a ``txt`` member holding an integer.
"""

from __future__ import annotations

import json
import math

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "pgm", "pbm", "bmp", "tif", "tiff")
JSON_LABEL_FIELDS = ("label", "cls", "class", "target")
INT64_MAX = 2**63 - 1


class BadLabel(ValueError):
    """A label member that is present but not a non-negative integer."""


def member(sample: dict, ext: str) -> bytes | None:
    """The member with extension ``ext``: ``sample[ext]``, else one whose name's last
    dot-component is ``ext`` (``v2.jpg`` of a key with a dot)."""
    if sample.get(ext) is not None:
        return sample[ext]
    for name, value in sample.items():
        if not name.startswith("__") and name.rsplit(".", 1)[-1].lower() == ext:
            return value
    return None


def image_member(sample: dict) -> bytes | None:
    """The image bytes of a webdataset sample dict, or None when it has no image member."""
    for ext in IMAGE_EXTS:
        data = member(sample, ext)
        if isinstance(data, bytes):
            return data
    return None


def _int_label(value, where: str) -> int:
    """A class index: a non-negative integer that fits int64. A float is accepted only when it is
    integral (``3.0``); ``2.7`` would otherwise become class 2 and ``Infinity`` or ``10**30``
    an OverflowError deep inside torch (issue 30)."""
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise BadLabel(f"{where} {value!r} is not an integer label")
    try:
        label = int(value.decode("ascii").strip() if isinstance(value, bytes) else value)
    except (UnicodeDecodeError, ValueError, TypeError, AttributeError, OverflowError):
        raise BadLabel(f"{where} is not an integer label") from None
    if label < 0 or isinstance(value, bool):
        raise BadLabel(f"{where} is not a non-negative integer label")
    if label > INT64_MAX:
        raise BadLabel(f"{where} does not fit a 64-bit class index")
    return label


def label_member(sample: dict) -> int | None:
    """The sample's class index, None when it has no label; :class:`BadLabel` when unparsable."""
    if (cls := member(sample, "cls")) is not None:
        return _int_label(cls, "cls")
    if (meta := member(sample, "json")) is not None:
        try:
            meta = json.loads(meta)
        except (ValueError, UnicodeDecodeError):
            raise BadLabel("json is not valid JSON") from None
        except RecursionError:  # 100,000 nested '[': the parser's recursion limit
            raise BadLabel("json is nested too deeply") from None
        if isinstance(meta, dict):
            for field in JSON_LABEL_FIELDS:
                if meta.get(field) is not None:
                    return _int_label(meta[field], f"json field {field!r}")
    if (txt := member(sample, "txt")) is not None:
        return _int_label(txt, "txt")
    return None
