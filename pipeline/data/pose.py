"""CoCosNet-v2's 20-channel pose input from OpenPose keypoints (DeepFashionHD).

Channels: 3 = the RGB skeleton drawing (joints as discs, limbs as blended ellipses), then 17 = one
distance map per limb (L1 distance to the limb's ellipse / 3, clipped to 255; 255 everywhere when
the limb is missing). Follows the official recipe (data/deepfashionHD_dataset.py) on a 1024-pixel
canvas; other canvas sizes scale the stick width, joint radius and distance unit with the canvas.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.errors import SkipSample
from pipeline.data.imageio import fit

NUM_JOINTS = 18  # OpenPose COCO-18 body model
NUM_LIMB_MAPS = 17  # the official code draws the first 17 limbs of the sequence below
POSE_CHANNELS = 3 + NUM_LIMB_MAPS
REFERENCE_CANVAS = 1024  # the official canvas side; sizes below are in its pixels
STICK_WIDTH = 20
JOINT_RADIUS = 20
DISTANCE_UNIT = 3
FRAME_TOLERANCE = 2.0  # pixels a keypoint may lie outside its canvas (keypoints may sit on the border)

# Joint pairs (1-based joint numbers, as OpenPose documents them) forming the limbs.
LIMBS = ((2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
         (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18))
# One colour per joint / limb, in the order cv2 draws them (B, G, R); the canvas is flipped to RGB.
COLORS_BGR = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
              (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
              (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))


def read_openpose(candidate_path: Path, subset_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parse OpenPose text output. -> candidate (N, >=2) float [x, y, ...], subset (18,) int (-1 = missing).

    The subset file may hold several people (rows of 18 indices + score + count); the first is used.
    Any problem raises SkipSample naming the file.
    """
    arrays = []
    for path in (candidate_path, subset_path):
        if not path.exists():
            raise SkipSample(str(path), "pose file is missing")
        try:
            arrays.append(np.loadtxt(path, ndmin=2, dtype=np.float64))
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise SkipSample(str(path), f"unreadable pose file ({type(exc).__name__}: {exc})") from None
    candidate, subset = arrays
    if candidate.shape[1] < 2 or not np.isfinite(candidate[:, :2]).all():
        raise SkipSample(str(candidate_path), f"candidate must be rows of finite x y ..., got shape {candidate.shape}")
    if subset.shape[0] < 1 or subset.shape[1] < NUM_JOINTS or not np.isfinite(subset[0, :NUM_JOINTS]).all():
        raise SkipSample(str(subset_path), f"subset must have >= {NUM_JOINTS} joint indices per row, "
                         f"got shape {subset.shape}")
    joints = subset[0, :NUM_JOINTS].astype(np.int64)
    if joints.max() >= len(candidate) or joints.min() < -1:
        raise SkipSample(str(subset_path), f"joint index out of range (candidate has {len(candidate)} rows)")
    return candidate, joints


def keypoints_in_frame(candidate: np.ndarray, joints: np.ndarray, canvas_hw: tuple[int, int],
                       tolerance: float = FRAME_TOLERANCE) -> bool:
    """Whether every detected joint lies on the (H, W) canvas, give or take `tolerance` pixels."""
    used = candidate[joints[joints >= 0], :2]
    height, width = canvas_hw
    return bool(((used >= -tolerance) & (used <= np.array([width, height]) + tolerance)).all())


def limb_ellipse(candidate: np.ndarray, a: int, b: int, stick_width: int) -> np.ndarray:
    """Polygon (K, 2) int of the ellipse spanning joints a and b (rows of candidate), like the official drawing."""
    (x0, y0), (x1, y1) = candidate[a, :2], candidate[b, :2]
    length = math.hypot(x0 - x1, y0 - y1)
    angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
    centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
    return cv2.ellipse2Poly(centre, (int(length / 2), stick_width), int(angle), 0, 360, 1)


def encode_pose(candidate: np.ndarray, joints: np.ndarray, canvas_hw: tuple[int, int],
                out_size: tuple[int, int]) -> np.ndarray:
    """OpenPose keypoints in a canvas of (H, W) pixels -> (20, h, w) uint8 pose map at out_size."""
    scale = max(canvas_hw) / REFERENCE_CANVAS
    stick, radius = max(1, round(STICK_WIDTH * scale)), max(1, round(JOINT_RADIUS * scale))
    canvas = np.zeros((*canvas_hw, 3), np.uint8)
    for j in range(NUM_JOINTS):
        if joints[j] != -1:
            x, y = candidate[joints[j], :2]
            cv2.circle(canvas, (int(x), int(y)), radius, COLORS_BGR[j], thickness=-1)
    distances = []
    for limb in range(NUM_LIMB_MAPS):
        a, b = (joints[j - 1] for j in LIMBS[limb])
        if a == -1 or b == -1:
            distances.append(np.full(out_size, 255, np.uint8))  # no limb: as far as can be stored
            continue
        polygon = limb_ellipse(candidate, a, b, stick)
        drawn = canvas.copy()
        cv2.fillConvexPoly(drawn, polygon, COLORS_BGR[limb])
        canvas = cv2.addWeighted(canvas, 0.4, drawn, 0.6, 0)  # limbs are translucent over earlier ones
        mask = np.zeros(canvas_hw, np.uint8)
        cv2.fillConvexPoly(mask, polygon, 255)
        distance = cv2.distanceTransform(255 - mask, cv2.DIST_L1, 3) / (DISTANCE_UNIT * scale)
        distances.append(fit(np.clip(distance, 0, 255).astype(np.uint8), out_size, "linear"))
    skeleton = fit(cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB), out_size, "nearest")
    return np.concatenate([skeleton.transpose(2, 0, 1), np.stack(distances)], axis=0)
