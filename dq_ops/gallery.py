"""Pictures for people to judge a run by looking at it: bin galleries and the reconstruction grid.

GraphCut fills bin 0 first with the samples closest to the rest of their class (dense, typical),
and each later bin with what is left, so the last bins hold rare and boundary cases. A gallery
shows a seeded uniform sample of each (class, bin) group:

- images: one PNG, one row per bin, a block of ``per_bin`` images per chosen class;
- texts: table rows (bin, class, example record) for a Prefect table artifact.

The reconstruction grid shows what patch dropping kept and what the MAE restored. Drawing only:
arrays in, PNG bytes or table rows out; callers store them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from dq_ops.errors import DQInputError
from dq_ops.patches import pixel_mask


def gallery_picks(
    bin_of_sample: np.ndarray, labels: np.ndarray | None, classes: Sequence[int], per_bin: int, seed: int = 0,
    chunk_rows: int | None = None,
) -> dict[tuple[int, int], np.ndarray]:
    """``{(class, bin): sample indices}``: up to ``per_bin`` samples of each (class, bin) group,
    drawn uniformly without replacement (``np.random.default_rng([seed, class, bin])``), sorted.

    With ``chunk_rows`` (the rows of a stored chunk) the draw goes chunk by chunk instead: the
    chunks in one seeded random order shared by every group, each group's members taken in that
    order (in random order within a chunk). Every group then draws from the same few chunks, so
    showing the picks of a large split decodes a few chunks rather than one per image.

    ``labels=None`` (unlabelled data) has the single class ``-1``.
    """
    bin_of_sample = np.asarray(bin_of_sample)
    labels = np.full(len(bin_of_sample), -1) if labels is None else np.asarray(labels)
    if labels.shape != bin_of_sample.shape:
        raise DQInputError(f"gallery: {len(bin_of_sample)} bin assignments but {len(labels)} labels")
    if per_bin < 1:
        raise DQInputError(f"gallery: per_bin must be >= 1, got {per_bin}")
    chunk_order = None
    if chunk_rows is not None:
        chunk_order = np.random.default_rng([seed, 0]).permutation(-(-len(bin_of_sample) // chunk_rows))
    picks = {}
    for cls in classes:
        for b in range(int(bin_of_sample.max()) + 1):
            members = np.flatnonzero((labels == cls) & (bin_of_sample == b))
            rng = np.random.default_rng([seed, int(cls) + 1, b])  # +1: class -1 must stay non-negative
            if chunk_order is None:
                chosen = rng.choice(members, size=min(per_bin, len(members)), replace=False)
            else:
                chosen = members[np.lexsort((rng.random(len(members)), chunk_order[members // chunk_rows]))[:per_bin]]
            picks[(int(cls), b)] = np.sort(chosen)
    return picks


def image_gallery(
    images: np.ndarray,
    bin_of_sample: np.ndarray,
    labels: np.ndarray | None,
    classes: Sequence[int],
    class_names: Sequence[str] | None = None,
    per_bin: int = 6,
    scale: int = 2,
    seed: int = 0,
) -> bytes:
    """PNG bytes: one row per bin (bin 0 on top), a block of ``per_bin`` images per class in ``classes``.

    ``images``: uint8 ``(n, H, W)`` or ``(n, H, W, C)`` (C = 1 or 3) of all samples the bins index;
    shown ``scale``× enlarged. Empty slots (a group smaller than ``per_bin``) stay white.
    """
    images = np.asarray(images, dtype=np.uint8)
    images = images if images.ndim == 4 else images[..., None]
    if images.shape[3] not in (1, 3):
        raise DQInputError(f"gallery: images need 1 or 3 channels, got shape {images.shape}")
    if len(images) != len(bin_of_sample):
        raise DQInputError(f"gallery: {len(images)} images but {len(bin_of_sample)} bin assignments")
    picks = gallery_picks(bin_of_sample, labels, classes, per_bin, seed)
    num_bins = int(np.asarray(bin_of_sample).max()) + 1
    h, w = images.shape[1] * scale, images.shape[2] * scale
    gap, block_gap, label_width, header = 2, 12, 52, 18
    block_width = per_bin * (w + gap)
    canvas = Image.new("RGB", (label_width + len(classes) * (block_width + block_gap), header + num_bins * (h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, cls in enumerate(classes):
        left = label_width + c * (block_width + block_gap)
        name = class_names[cls] if class_names is not None and 0 <= cls < len(class_names) else f"class {cls}"
        draw.text((left, 3), str(name), fill="black")
        for b in range(num_bins):
            top = header + b * (h + gap)
            if c == 0:
                draw.text((4, top + h // 2 - 6), f"bin {b}", fill="black")
            for k, index in enumerate(picks[(int(cls), b)]):
                tile = images[index]
                tile = np.repeat(tile, 3, axis=2) if tile.shape[2] == 1 else tile
                canvas.paste(Image.fromarray(tile).resize((w, h), Image.NEAREST), (left + k * (w + gap), top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()


def text_gallery(
    texts: Sequence[str],
    bin_of_sample: np.ndarray,
    labels: np.ndarray | None,
    classes: Sequence[int],
    class_names: Sequence[str] | None = None,
    per_bin: int = 2,
    max_chars: int = 200,
    seed: int = 0,
) -> list[dict[str, object]]:
    """Table rows ``{"bin", "class", "example"}``: ``per_bin`` records per (class, bin), bins in
    order, each record cut to ``max_chars`` characters (an ellipsis marks the cut)."""
    if len(texts) != len(bin_of_sample):
        raise DQInputError(f"gallery: {len(texts)} records but {len(bin_of_sample)} bin assignments")
    rows = []
    picks = gallery_picks(bin_of_sample, labels, classes, per_bin, seed)
    num_bins = int(np.asarray(bin_of_sample).max()) + 1
    for b in range(num_bins):
        for cls in classes:
            name = class_names[cls] if class_names is not None and 0 <= cls < len(class_names) else str(cls)
            for index in picks[(int(cls), b)]:
                text = " ".join(str(texts[index]).split())
                rows.append({"bin": b, "class": name, "example": text if len(text) <= max_chars else text[:max_chars - 1] + "…"})
    return rows


def reconstruction_grid(original: np.ndarray, keep_mask: np.ndarray, reconstruction: np.ndarray, scale: int = 4) -> bytes:
    """PNG of three rows — original | kept patches | reconstruction — one column per image.

    Images are uint8 ``(n, H, W)`` or ``(n, H, W, C)`` (C = 1 or 3), shown ``scale``× enlarged.
    Dropped patches are drawn dark red in the middle row so that they are not mistaken for a
    black background.
    """
    keep_mask = np.asarray(keep_mask, dtype=bool)

    def as_rgb(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.uint8)
        images = images if images.ndim == 4 else images[..., None]
        return np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images

    first, last = as_rgb(original), as_rgb(reconstruction)
    n, h, w = first.shape[:3]
    kept = pixel_mask(keep_mask, (h // keep_mask.shape[1], w // keep_mask.shape[2]))[..., None]
    rows = {
        "original": first,
        "kept patches": np.where(kept, first, np.array([110, 20, 20], np.uint8)),
        "reconstruction": last,
    }
    label_width, gap, cell_h, cell_w = 100, 2, h * scale, w * scale
    canvas = Image.new("RGB", (label_width + n * (cell_w + gap), len(rows) * (cell_h + gap)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, images) in enumerate(rows.items()):
        top = r * (cell_h + gap)
        draw.text((4, top + cell_h // 2 - 6), title, fill="black")
        for c, image in enumerate(images):
            canvas.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (label_width + c * (cell_w + gap), top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
