"""Input-domain maps computed from labels or photos: region boundaries, Canny edges and distance maps."""
from __future__ import annotations

import cv2
import numpy as np


def label_boundaries(labels: np.ndarray) -> np.ndarray:
    """(H, W) ids -> (H, W) bool, True on both sides of every change of id between 4-neighbours."""
    edge = np.zeros(labels.shape, dtype=bool)
    horizontal = labels[:, 1:] != labels[:, :-1]
    vertical = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    return edge


def canny_edges(photo: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) bool edges.

    Like skimage.feature.canny with its defaults (as CoCosNet v1 used): Gaussian sigma 1, hysteresis
    thresholds at 10% and 20% of the strongest gradient, so the result does not depend on contrast.
    """
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    smooth = cv2.GaussianBlur(grey, (0, 0), 1.0)
    gx = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    strongest = float(np.sqrt(gx * gx + gy * gy).max())
    if strongest < 1e-6:
        return np.zeros(grey.shape, dtype=bool)
    return cv2.Canny(smooth, 0.1 * strongest, 0.2 * strongest, L2gradient=True) > 0


def as_edge_map(edges: np.ndarray) -> np.ndarray:
    """bool (H, W) -> (H, W) uint8 in {0, 255}, the stored form of a 1-channel edge map."""
    return edges.astype(np.uint8) * 255


def distance_map(boundary: np.ndarray) -> np.ndarray:
    """bool (H, W) boundary -> (H, W) uint8 L1 distance to it, clipped at 255, as CoCosNet v1's per-part maps of the
    CelebA-HQ edge task: in units of 3 pixels at 256 (scaled with the shorter side); all 255 ("far") where there is
    no boundary."""
    if not boundary.any():
        return np.full(boundary.shape, 255, np.uint8)
    unit = 3 * min(boundary.shape) / 256
    distance = cv2.distanceTransform(255 - as_edge_map(boundary), cv2.DIST_L1, 3) / unit
    return np.clip(distance, 0, 255).astype(np.uint8)
