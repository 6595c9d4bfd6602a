"""The unit of data: one tagged image-text pair (SafeTag-VL-3K schema, docs/method.md section 1).

Kept in its own leaf module so that both the model side (`policy/inputs.py`) and the data side
(`data/datamodule.py`) can import it without importing each other. The checks of a record's own fields
(`normalize_tag`, `decode_image`) live here too; `data/datamodule.py` turns their failures into errors that
name the record.
"""

from __future__ import annotations

import io
import os
import re
import stat
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError

Tag = Literal["safe", "unsafe"]
TAG_VALUES: tuple[str, ...] = ("safe", "unsafe")
"""The only values a safety tag may carry: in a record's labels, in the prompt's format, in a
completion (where a tag with any other value is skipped as invalid)."""


@dataclass(frozen=True)
class SafetyRecord:
    """One image-text pair with its three safety labels.

    Attributes:
        image: the visual input, already decoded to an RGB PIL image (validated at setup so that
            a corrupt file fails before training, not mid-epoch). None only for text-only models.
        prompt: the user's instruction, without the safety guide.
        image_tag: "safe" or "unsafe": is the image alone unsafe.
        text_tag: "safe" or "unsafe": is the instruction alone unsafe.
        combine_tag: "safe" or "unsafe": is the pair unsafe.
        id: provenance id, kept through to logs and error messages.
        source: where the record came from (e.g. "vlguard", "demo-picture"); metrics split by it.
        caption: what the image shows, when the source knows it (the demo does); the format
            warm-up writes it as the response's first step. Never a safety judgement.
        novelty: how a held-out record relates to the training split, when the source knows
            (the demo does): "unseen-pair" (its image content and instruction both occur in
            training, never together) or "unseen-wording" (its instruction's wording never
            occurs in training). Empty when unknown, and on training records. The report
            splits the held-out figures by it.
    """

    image: Image.Image | None
    prompt: str
    image_tag: str
    text_tag: str
    combine_tag: str
    id: str = ""
    source: str = ""
    caption: str = ""
    novelty: str = ""

    @property
    def is_compositional(self) -> bool:
        """Both parts safe on their own, the pair unsafe: the case the paper calls compositional."""
        return self.image_tag == "safe" and self.text_tag == "safe" and self.combine_tag == "unsafe"

    def describe(self, index: int | None = None) -> str:
        """A short locator for error messages: `record 17 (id=vlg-0042, source=vlguard)`."""
        where = f"record {index}" if index is not None else "record"
        return f"{where} (id={self.id or '?'}, source={self.source or '?'})"


# -- validation of the record's fields (used by `data/datamodule.py` when it builds records) ---------------


def normalize_tag(value: Any) -> str | None:
    """`value` as a lower-case tag ("Safe", " UNSAFE " -> "safe", "unsafe"); None if not a tag."""
    tag = value.strip().lower() if isinstance(value, str) else None
    return tag if tag in TAG_VALUES else None


_OBJECT_ADDRESS = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


# Limits on one image: PIL's own decompression-bomb threshold (89.5 M pixels; PIL only warns
# below twice that), and bytes read from one file (a path to a device or a huge file must not
# hang or exhaust memory).
MAX_IMAGE_PIXELS = 89_478_485
MAX_IMAGE_BYTES = 256 * 2**20


class ImageDecodeError(ValueError):
    """An image cell that cannot become a record's image.

    Attributes:
        kind: "missing_image", "unreadable_image" (a path that cannot or may not be read),
            "corrupt_image" (bytes PIL cannot decode) or "oversized_image" (more pixels or
            bytes than one record may have).
        found: what was found, in words, for the error message.
    """

    def __init__(self, kind: str, found: str) -> None:
        super().__init__(f"{kind}: {found}")
        self.kind, self.found = kind, found


def _too_many_pixels(what: str, width: int, height: int) -> ImageDecodeError:
    return ImageDecodeError(
        "oversized_image",
        f"{what} of {width} x {height} pixels ({width * height / 1e6:.1f} M), more than the "
        f"{MAX_IMAGE_PIXELS / 1e6:.1f} M one image may have (a decompression bomb?); resize it",
    )


def _decode_bytes(data: bytes, what: str) -> Image.Image:
    if not data:
        raise ImageDecodeError("corrupt_image", f"{what}: empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # the size is checked below, before any pixel
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        with image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise _too_many_pixels(what, image.width, image.height)
            image.load()  # decode every pixel now: a truncated file fails here, not mid-epoch
            return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(
            "oversized_image", f"{what} with too many pixels ({err}); resize it"
        ) from err
    except UnidentifiedImageError as err:
        raise ImageDecodeError(
            "corrupt_image",
            f"{what} that PIL cannot decode: in no image format it reads (it starts with "
            f"{data[:12]!r})",
        ) from err
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageDecodeError):
            raise
        reason = _OBJECT_ADDRESS.sub("the data", str(err))  # no "<_io.BytesIO object at 0x..>"
        raise ImageDecodeError(
            "corrupt_image", f"{what} that PIL cannot decode ({reason})"
        ) from err


def _image_path(value: str, base_dir: Path | None) -> Path:
    """The file an image path names; a relative path must stay inside `base_dir`."""
    path = Path(value)
    if path.is_absolute() or base_dir is None:
        return path
    inside = Path(os.path.normpath(base_dir / path))  # lexically: a symlinked folder is fine
    if not inside.is_relative_to(os.path.normpath(base_dir)):
        raise ImageDecodeError(
            "unreadable_image",
            f"path {value!r}, which leads out of the data folder {str(base_dir)!r}; keep images "
            "inside it, or give an absolute path",
        )
    return inside


def _read_image_file(path: Path) -> bytes:
    try:
        info = path.stat()
    except OSError as err:
        raise ImageDecodeError("unreadable_image", f"path {str(path)!r} ({err.strerror})") from err
    if not stat.S_ISREG(info.st_mode):
        raise ImageDecodeError(
            "unreadable_image", f"path {str(path)!r}, which is not a regular file"
        )
    if info.st_size > MAX_IMAGE_BYTES:
        raise ImageDecodeError(
            "oversized_image",
            f"file {str(path)!r} of {info.st_size / 2**20:.0f} MiB, more than the "
            f"{MAX_IMAGE_BYTES / 2**20:.0f} MiB one image may have",
        )
    try:
        return path.read_bytes()
    except OSError as err:
        raise ImageDecodeError("unreadable_image", f"path {str(path)!r} ({err.strerror})") from err


def decode_image(value: Any, base_dir: Path | None = None) -> Image.Image:
    """Decode one image cell to the RGB PIL image a `SafetyRecord` holds.

    Accepts what `datasets` and data files hold: a PIL image, bytes, a path (relative paths
    start at `base_dir` and must stay inside it), a `{"bytes": ..., "path": ...}` dict (bytes
    first), or a list of those (SafeTag-VL-3K's `images` column), whose first item is used.

    Raises:
        ImageDecodeError: its `kind` says whether the image is missing, unreadable, corrupt or
            oversized.
    """
    if isinstance(value, list | tuple):
        if not value:
            raise ImageDecodeError("missing_image", "an empty list")
        value = value[0]
    if isinstance(value, Image.Image):
        if value.width * value.height > MAX_IMAGE_PIXELS:
            raise _too_many_pixels("an image", value.width, value.height)
        return value.convert("RGB")
    if isinstance(value, Mapping):
        value = value.get("bytes") or value.get("path")
    if value is None or value == "":
        raise ImageDecodeError("missing_image", "missing (empty or absent)")
    if isinstance(value, bytes | bytearray):
        return _decode_bytes(bytes(value), f"{len(value)} bytes")
    if not isinstance(value, str):
        raise ImageDecodeError("unreadable_image", f"a {type(value).__name__}")
    path = _image_path(value, base_dir)
    return _decode_bytes(_read_image_file(path), f"file {str(path)!r}")
