"""Face boxes for `predict` on ordinary photos, from the optional `face` extra.

The detector is OpenCV's frontal-face Haar cascade (`pip install 'cunet-optimize[face]'`,
opencv-python-headless): it installs from PyPI with its trained cascade inside the
package, so nothing is downloaded at run time. Without the extra, or when no face is
found, `predict` falls back to the whole image as the face crop and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EXTRA = "pip install 'cunet-optimize[face]'"
CASCADE = "haarcascade_frontalface_default.xml"
MIN_FACE_FRACTION = 0.08  # ignore detections smaller than this share of the shorter image side


class DetectorUnavailable(RuntimeError):
    """The `face` extra (OpenCV) is not installed or its cascade is missing."""


_cascade = None
_told_unavailable = False


def _load_cascade():
    global _cascade
    if _cascade is None:
        try:
            import cv2
        except ImportError as exc:
            raise DetectorUnavailable(f"no face detector installed ({EXTRA})") from exc
        path = Path(cv2.data.haarcascades) / CASCADE
        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise DetectorUnavailable(f"OpenCV's {CASCADE} is missing from {path.parent}; reinstall ({EXTRA})")
        _cascade = cascade
    return _cascade


def detect_face(image: np.ndarray) -> list[float] | None:
    """[x1, y1, x2, y2] of the largest frontal face in an HxWx3 uint8 RGB image, or None.

    Raises DetectorUnavailable without the extra."""
    cascade = _load_cascade()
    import cv2
    grey = cv2.equalizeHist(cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY))
    side = max(24, int(MIN_FACE_FRACTION * min(grey.shape)))
    faces = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
    if len(faces) == 0:
        return None
    x, y, w, h = max((tuple(int(v) for v in f) for f in faces), key=lambda f: f[2] * f[3])
    return [float(x), float(y), float(x + w), float(y + h)]


def face_box_or_whole_image(image: np.ndarray, where: str) -> list[float] | None:
    """The detected face box, or None (the whole image is the crop) with a warning saying why."""
    try:
        box = detect_face(image)
    except DetectorUnavailable as exc:
        global _told_unavailable
        if not _told_unavailable:  # once per run, not once per image
            log.warning("%s; using the whole image as the face crop (or pass --box X1,Y1,X2,Y2)", exc)
            _told_unavailable = True
        return None
    if box is None:
        log.warning("%s: no face found; using the whole image as the face crop (or pass --box X1,Y1,X2,Y2)", where)
    return box
