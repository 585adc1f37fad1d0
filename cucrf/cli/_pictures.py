"""What the commands write as pictures: label PNGs of class ids, overlays and comparison strips."""

from __future__ import annotations

import numpy as np

#: A label PNG holds 16-bit ids at most: class ids 0..65535.
PNG_MAX_CLASSES = 65536
#: The VOC palette colours 256 class ids (255 doubles as "ignore / unknown").
COLOUR_MAX_CLASSES = 256

GAP = 4  # white pixels between the panels of a strip


def label_dtype(num_classes: int):
    """The dtype of a label PNG for ``num_classes`` classes: uint8 up to 256, uint16 up to 65536."""
    if num_classes > PNG_MAX_CLASSES:
        raise ValueError(f"a label PNG holds at most {PNG_MAX_CLASSES} class ids (16 bits); got {num_classes} classes")
    return np.uint8 if num_classes <= 256 else np.uint16


def write_label_png(path, labels, num_classes: int) -> None:
    """Write a label map as a single-channel PNG whose pixel values are the class ids.

    The file reads back as the same ids with any reader (``imageio.v3.imread``, Pillow, OpenCV
    with ``IMREAD_UNCHANGED``): 8-bit grey for up to 256 classes, 16-bit grey for more. The
    dtype depends on ``num_classes``, not on the ids present, so that every map of one model has
    the same format.

    Parameters
    ----------
    path : str or os.PathLike
        Output ``.png`` file.
    labels : numpy.ndarray of int, shape (H, W)
        Class ids in ``[0, num_classes)`` (255 may mark ignored pixels of an 8-bit map).
    num_classes : int
        Number of classes, at most :data:`PNG_MAX_CLASSES`.
    """
    import imageio.v3 as iio

    iio.imwrite(path, np.ascontiguousarray(labels.astype(label_dtype(num_classes), copy=False)), extension=".png")


def image_rgb(image) -> np.ndarray:
    """An image for display: (H, W, 3) uint8 from (H, W, F) uint8, uint16 or float in [0, 1] or [0, 255].

    Grey images are repeated into three channels; only the first three channels of others are shown.
    """
    from .. import palette

    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)  # the high byte: what an 8-bit viewer shows
    elif img.dtype != np.uint8:
        scale = 255.0 if img.size and float(np.nanmax(img)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img.astype(np.float64) * scale), 0, 255).round().astype(np.uint8)
    if img.shape[2] == 2:
        img = img[:, :, :1]
    return palette._as_rgb(img[:, :, :3] if img.shape[2] > 3 else img)


def caption_strip(panels, captions, gap=GAP):
    """Row of panels (H, W, 3) with captions above them, ``gap`` white pixels between panels."""
    h = panels[0].shape[0]
    white = np.full((h, gap, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [white, p]
    body = np.concatenate(row, axis=1)
    try:
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default()
        strip = Image.new("RGB", (body.shape[1], 18), "white")
        draw = ImageDraw.Draw(strip)
        x = 0
        for panel, caption in zip(panels, captions):
            width = panel.shape[1]
            while caption and draw.textlength(caption, font=font) > width - 4:
                caption = caption[:-1]  # shorten captions that do not fit small panels
            draw.text((x + 2, 3), caption, fill="black", font=font)
            x += width + gap
        return np.concatenate([np.asarray(strip), body], axis=0)
    except Exception:  # captions are decoration: never fail a command because of a font
        return body


def legend(entries, width: int):
    """Colour swatches with their class ids and names, in rows that fit ``width`` pixels.

    Parameters
    ----------
    entries : list of (int, str)
        Class id (coloured with the VOC palette) and its name.
    width : int
        Width of the legend in pixels.

    Returns
    -------
    numpy.ndarray of uint8, shape (h, width, 3), or None
        None when there is nothing to show or no font to draw with.
    """
    if not entries:
        return None
    from .. import palette

    try:
        from PIL import Image, ImageDraw, ImageFont

        font = ImageFont.load_default()
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        items = [(i, f"{i} {name}", measure.textlength(f"{i} {name}", font=font)) for i, name in entries]
        row_h, swatch = 16, 10
        rows, x = [[]], 4
        for item in items:  # wrap: an entry is a swatch, a space, its text and a margin
            w = swatch + 4 + item[2] + 12
            if rows[-1] and x + w > width:
                rows.append([])
                x = 4
            rows[-1].append((x, item))
            x += w
        img = Image.new("RGB", (width, row_h * len(rows) + 4), "white")
        draw = ImageDraw.Draw(img)
        for r, row in enumerate(rows):
            y = 4 + r * row_h
            for x, (i, text, _) in row:
                colour = tuple(int(v) for v in palette.PALETTE[i])
                draw.rectangle([x, y + 1, x + swatch - 1, y + swatch], fill=colour, outline="black")
                draw.text((x + swatch + 4, y), text, fill="black", font=font)
        return np.asarray(img)
    except Exception:  # the legend is decoration: never fail a command because of a font
        return None


def comparison_strip(panels, captions, entries):
    """Panels side by side with captions above and a legend of ``entries`` below, (h, w, 3) uint8."""
    strip = caption_strip(panels, captions)
    below = legend(entries, strip.shape[1])
    return strip if below is None else np.concatenate([strip, below], axis=0)


def legend_entries(label_maps, class_names, special=None):
    """(id, name) of every class shown in ``label_maps``, sorted.

    ``class_names[i]`` names class ``i`` (``"class i"`` beyond the list); ``special`` maps ids
    such as 255 to a name of their own (``{255: "ignore"}``).
    """
    special = special or {}
    present = np.unique(np.concatenate([np.unique(m) for m in label_maps]))
    entries = []
    for i in (int(v) for v in present):
        if i in special:
            entries.append((i, special[i]))
        elif i < len(class_names):
            entries.append((i, class_names[i]))
        else:
            entries.append((i, f"class {i}"))
    return entries
