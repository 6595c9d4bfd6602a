"""The pixels of the demo set: ten simple objects drawn with Pillow, a background, noise.

Each object is a few filled shapes in three colours of its category's palette (see
`safegrpo_pl.demo.dataset`, which decides what to draw; this module only draws it). Shapes are
placed in unit coordinates, [-1, 1] on both axes around the object's centre, which
`UnitCanvas` maps to pixels, so one drawing serves every image size, position and scale.
Nothing here draws random numbers except through the `random.Random` it is given, so the same
generator state gives the same bytes.
"""

from __future__ import annotations

import random
import textwrap
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LINE_HEIGHT = 13
"""Pixels from one line of text to the next (the glyphs are 11 px tall)."""


def bitmap_font() -> ImageFont.ImageFont:
    """PIL's built-in 6x11 px bitmap font (no font file, same glyphs everywhere).

    Pillow >= 10.1 returns a FreeType font from `load_default()` when FreeType is present, so
    ask for the bitmap one by name where it exists.
    """
    loader = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)
    return loader()


# Typographic stand-ins the Latin-1 bitmap font can draw; anything else left becomes "?".
_PLAIN_PUNCTUATION = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u2026": "...",
    }
)


def bitmap_safe_text(text: str) -> str:
    """`text` with whitespace normalised and only characters PIL's bitmap font can draw.

    The font covers Latin-1: curly quotes and dashes become their plain forms, any other
    character outside Latin-1 becomes "?" (instead of a UnicodeEncodeError mid-render).
    """
    plain = " ".join(text.split()).translate(_PLAIN_PUNCTUATION)
    return plain.encode("latin-1", errors="replace").decode("latin-1")


def render_text_image(text: str, *, width: int = 448, scale: int = 2) -> Image.Image:
    """Render `text` black on white, word-wrapped, with PIL's bitmap font (typographic image).

    Used by `scripts/make_typographic.py` to turn text-only prompts into images. The bitmap
    font is 6x11 px per character, so the text is laid out on a canvas of `width / scale` px
    and enlarged `scale` times (nearest neighbour: crisp glyphs for a real vision encoder).
    The image is `width` px wide (rounded down to a multiple of `scale`) and at least as tall,
    taller when the text needs it.

    Args:
        text: the instruction to render; whitespace is normalised, characters outside Latin-1
            are replaced (see `bitmap_safe_text`).
        width: width of the output image in pixels.
        scale: enlargement of the bitmap font (1 = 11 px tall letters).
    """
    if scale < 1 or width < 16 * scale:
        raise ValueError(
            f"render_text_image: width={width}, scale={scale}; need scale >= 1 "
            f"and width >= 16 * scale"
        )
    font = bitmap_font()
    canvas_width = width // scale
    lines = textwrap.wrap(bitmap_safe_text(text), width=max(1, (canvas_width - 8) // 6)) or [""]
    canvas_height = max(canvas_width, LINE_HEIGHT * len(lines) + 8)
    image = Image.new("RGB", (canvas_width, canvas_height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    top = (canvas_height - LINE_HEIGHT * len(lines)) // 2
    for i, line in enumerate(lines):
        draw.text((4, top + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=font)
    return image.resize((canvas_width * scale, canvas_height * scale), Image.Resampling.NEAREST)


Colour = tuple[int, ...]
"""An RGB colour."""


def jitter_colour(colour: Colour, rng: random.Random, amount: int = 20) -> Colour:
    """`colour` with each channel moved by a random whole number in [-amount, amount]."""
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)


class UnitCanvas:
    """Draws shapes given in unit coordinates ([-1, 1] around the object's centre) as pixels.

    Args:
        draw: the Pillow drawing context of the image.
        centre_x: the object's centre, in pixels from the left.
        centre_y: the object's centre, in pixels from the top.
        scale: pixels per unit: the object spans about `2 * scale` pixels.
    """

    def __init__(
        self, draw: ImageDraw.ImageDraw, centre_x: float, centre_y: float, scale: float
    ) -> None:
        self.draw, self.centre_x, self.centre_y, self.scale = draw, centre_x, centre_y, scale

    def xy(self, *points: float) -> list[tuple[float, float]]:
        """Pixel positions of the unit points `x0, y0, x1, y1, ...`."""
        pairs = zip(points[0::2], points[1::2], strict=True)
        return [(self.centre_x + x * self.scale, self.centre_y + y * self.scale) for x, y in pairs]

    def rect(self, x0: float, y0: float, x1: float, y1: float, fill: Colour) -> None:
        self.draw.rectangle(self.xy(x0, y0, x1, y1), fill=fill)

    def ellipse(self, x0: float, y0: float, x1: float, y1: float, fill: Colour) -> None:
        self.draw.ellipse(self.xy(x0, y0, x1, y1), fill=fill)

    def polygon(self, *points: float, fill: Colour) -> None:
        self.draw.polygon(self.xy(*points), fill=fill)

    def line(self, *points: float, fill: Colour, width: float) -> None:
        """A polyline; `width` is in units too (at least one pixel)."""
        self.draw.line(self.xy(*points), fill=fill, width=max(1, round(width * self.scale)))


# -- the objects: each takes the canvas and its palette's primary, secondary and accent colour --


def _draw_knife(canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour) -> None:
    canvas.polygon(-0.35, -0.55, 0.55, -0.55, 0.98, 0.05, 0.55, 0.4, -0.35, 0.4, fill=primary)
    canvas.rect(-0.98, -0.28, -0.35, 0.22, fill=secondary)  # handle
    canvas.rect(-0.45, -0.6, -0.33, 0.5, fill=accent)  # guard


def _draw_gun(canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour) -> None:
    canvas.rect(-0.9, -0.6, 0.9, -0.05, fill=primary)  # barrel and slide
    canvas.polygon(-0.75, -0.05, -0.2, -0.05, 0.0, 0.85, -0.55, 0.85, fill=secondary)  # grip
    canvas.line(-0.1, 0.05, 0.2, 0.35, -0.15, 0.45, fill=accent, width=0.1)  # trigger


def _draw_bomb(canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour) -> None:
    canvas.ellipse(-0.7, -0.45, 0.7, 0.95, fill=primary)
    canvas.rect(-0.15, -0.65, 0.15, -0.4, fill=secondary)  # cap
    canvas.line(0.0, -0.65, 0.35, -0.85, fill=secondary, width=0.07)  # fuse
    canvas.ellipse(0.3, -0.98, 0.55, -0.73, fill=accent)  # spark


def _draw_chemical_bottle(
    canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour
) -> None:
    canvas.rect(-0.45, -0.3, 0.45, 0.9, fill=primary)  # body
    canvas.rect(-0.15, -0.65, 0.15, -0.3, fill=primary)  # neck
    canvas.rect(-0.2, -0.85, 0.2, -0.65, fill=secondary)  # cap
    canvas.polygon(0.0, 0.0, 0.3, 0.55, -0.3, 0.55, fill=secondary)  # warning triangle
    canvas.ellipse(-0.06, 0.25, 0.06, 0.37, fill=accent)  # mark on the triangle


def _draw_pill_bottle(
    canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour
) -> None:
    canvas.rect(-0.5, -0.25, 0.3, 0.75, fill=primary)  # body
    canvas.rect(-0.6, -0.55, 0.4, -0.25, fill=secondary)  # lid
    canvas.rect(-0.4, 0.1, 0.2, 0.45, fill=accent)  # label
    for x, y in ((0.55, 0.6), (0.75, 0.4), (0.6, 0.85)):  # pills beside it
        canvas.ellipse(x - 0.12, y - 0.07, x + 0.12, y + 0.07, fill=secondary)


def _draw_lighter(canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour) -> None:
    canvas.rect(-0.42, -0.15, 0.42, 0.9, fill=primary)  # body
    canvas.rect(-0.42, -0.4, 0.42, -0.15, fill=accent)  # head
    canvas.polygon(0.0, -0.98, 0.25, -0.6, 0.0, -0.42, -0.25, -0.6, fill=secondary)  # flame


def _draw_cake(canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour) -> None:
    canvas.rect(-0.75, 0.1, 0.75, 0.8, fill=secondary)  # bottom tier
    canvas.rect(-0.55, -0.3, 0.55, 0.1, fill=primary)  # top tier
    canvas.rect(-0.75, 0.35, 0.75, 0.45, fill=accent)  # icing band
    for x in (-0.3, 0.0, 0.3):  # candles
        canvas.rect(x - 0.04, -0.6, x + 0.04, -0.3, fill=accent)


def _draw_tree(canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour) -> None:
    canvas.rect(-0.12, 0.2, 0.12, 0.92, fill=secondary)  # trunk
    canvas.ellipse(-0.7, -0.9, 0.7, 0.4, fill=primary)  # crown
    canvas.ellipse(-0.35, -0.6, 0.05, -0.2, fill=accent)  # highlight


def _draw_house(canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour) -> None:
    canvas.rect(-0.6, -0.1, 0.6, 0.85, fill=secondary)  # walls
    canvas.polygon(-0.8, -0.1, 0.0, -0.85, 0.8, -0.1, fill=primary)  # roof
    canvas.rect(-0.15, 0.35, 0.15, 0.85, fill=accent)  # door
    canvas.rect(0.25, 0.1, 0.45, 0.3, fill=accent)  # window


def _draw_flower(canvas: UnitCanvas, primary: Colour, secondary: Colour, accent: Colour) -> None:
    canvas.line(0.0, -0.1, 0.0, 0.95, fill=primary, width=0.09)  # stem
    canvas.ellipse(0.0, 0.4, 0.45, 0.6, fill=primary)  # leaf
    for x, y in ((0.0, -0.65), (0.35, -0.3), (0.0, 0.05), (-0.35, -0.3)):  # petals
        canvas.ellipse(x - 0.25, y - 0.25, x + 0.25, y + 0.25, fill=secondary)
    canvas.ellipse(-0.15, -0.45, 0.15, -0.15, fill=accent)  # centre


ObjectDrawing = Callable[[UnitCanvas, Colour, Colour, Colour], None]
"""Draws one object: (canvas, primary, secondary, accent colour) -> None."""

OBJECT_DRAWINGS: dict[str, ObjectDrawing] = {
    "knife": _draw_knife,
    "gun": _draw_gun,
    "bomb": _draw_bomb,
    "chemical bottle": _draw_chemical_bottle,
    "pill bottle": _draw_pill_bottle,
    "lighter": _draw_lighter,
    "cake": _draw_cake,
    "tree": _draw_tree,
    "house": _draw_house,
    "flower": _draw_flower,
}
"""Object name -> its drawing."""


# -- background and noise ----------------------------------------------------------------------


def plain_background(size: int, rng: random.Random) -> Image.Image:
    """A square light-grey image, its shade drawn at random."""
    base = rng.randint(210, 232)
    return Image.new("RGB", (size, size), jitter_colour((base, base, base), rng, 5))


def add_noise(image: Image.Image, rng: random.Random, sigma: float = 6.0) -> Image.Image:
    """Gaussian pixel noise from a seeded numpy generator (PIL's own noise is not seedable)."""
    noise_rng = np.random.default_rng(rng.getrandbits(64))
    pixels = np.asarray(image, dtype=np.float32)  # (H, W, 3)
    pixels = pixels + noise_rng.normal(0.0, sigma, size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
