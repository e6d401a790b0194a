"""Pictures of CAMs, label maps and predictions (numpy in, RGB uint8 out)."""

from __future__ import annotations

import cv2
import numpy as np

from wsss.artifacts import IGNORE_INDEX, voc_palette


def colorize_label(label: np.ndarray) -> np.ndarray:
    """Label map uint8 [H, W] -> RGB uint8 [H, W, 3] in the VOC palette (255 = cream)."""
    return voc_palette()[np.asarray(label, dtype=np.uint8)]


def overlay_label(image: np.ndarray, label: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend a coloured label map over an RGB image; background and ignore pixels stay untouched."""
    colour = colorize_label(label).astype(np.float32)
    out = image.astype(np.float32)
    blend = (label != 0) & (label != IGNORE_INDEX)
    out[blend] = (1 - alpha) * out[blend] + alpha * colour[blend]
    return out.round().astype(np.uint8)


def cam_heatmap(image: np.ndarray, cams: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Overlay the per-pixel maximum of CAMs float [K, H, W] (values in [0, 1]) as a jet heatmap."""
    score = cams.max(axis=0) if len(cams) else np.zeros(image.shape[:2], np.float32)
    heat = cv2.applyColorMap((np.clip(score, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat, cv2.COLOR_BGR2RGB).astype(np.float32)
    return ((1 - alpha) * image.astype(np.float32) + alpha * heat).round().astype(np.uint8)


def labelled_tile(tile: np.ndarray, caption: str, height: int) -> np.ndarray:
    """Resize a tile to ``height`` (nearest, so labels stay crisp) and write a caption strip above it."""
    scale = height / tile.shape[0]
    width = max(1, round(tile.shape[1] * scale))
    tile = cv2.resize(tile, (width, height), interpolation=cv2.INTER_NEAREST)
    strip = np.full((18, width, 3), 255, np.uint8)
    cv2.putText(strip, caption[: max(1, width // 7)], (2, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1,
                cv2.LINE_AA)
    return np.vstack([strip, tile])


def grid(rows: list[list[np.ndarray]], gap: int = 4) -> np.ndarray:
    """Stack rows of equally tall tiles into one RGB picture with white gaps."""
    rendered = []
    for row in rows:
        pieces = []
        for tile in row:
            pieces += [tile, np.full((tile.shape[0], gap, 3), 255, np.uint8)]
        rendered.append(np.hstack(pieces[:-1]))
    width = max(row.shape[1] for row in rendered)
    padded = [np.pad(row, ((0, gap), (0, width - row.shape[1]), (0, 0)), constant_values=255) for row in rendered]
    return np.vstack(padded)[:-gap]
