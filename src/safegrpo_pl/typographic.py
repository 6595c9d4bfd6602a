"""Text drawn with PIL's built-in bitmap font: instructions turned into (typographic) images.

The bitmap font needs no font file and draws the same glyphs on every machine, so a rendered
image depends on the text alone. The demo set writes its typographic records with it
(`safegrpo_pl.demo_data.draw_typographic`), and `scripts/make_typographic.py` turns a file of
text-only prompts into an image-text dataset with `render_text_image`, as the paper did with
BeaverTails.
"""

from __future__ import annotations

import textwrap

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
