"""The unit of data: one tagged image-text pair (SafeTag-VL-3K schema, SPEC section 1).

Kept in its own leaf module so that both the model side (`inputs.py`) and the data side
(`data.py`) can import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from PIL import Image

Tag = Literal["safe", "unsafe"]
TAG_VALUES: tuple[str, ...] = ("safe", "unsafe")


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
    """

    image: Image.Image | None
    prompt: str
    image_tag: str
    text_tag: str
    combine_tag: str
    id: str = ""
    source: str = ""

    @property
    def is_compositional(self) -> bool:
        """Both parts safe on their own, the pair unsafe: the case the paper calls compositional."""
        return (
            self.image_tag == "safe" and self.text_tag == "safe" and self.combine_tag == "unsafe"
        )

    def describe(self, index: int | None = None) -> str:
        """A short locator for error messages: `record 17 (id=vlg-0042, source=vlguard)`."""
        where = f"record {index}" if index is not None else "record"
        return f"{where} (id={self.id or '?'}, source={self.source or '?'})"
