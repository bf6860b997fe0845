"""Mirror averaging: FaceMesh on a face and on its mirror image, the two point sets averaged.

Why: FaceMesh's points carry a per-photo error that is not mirror-symmetric (the network's left/right
biases, pixel grid, lighting): the same face's metric mesh moves by ~1.4 mm RMS (shape only) between a
photo and its mirror, grey copy or rotated copy, which hides the ~5.6 mm that tell different people apart.
Running FaceMesh on the horizontally flipped face and mapping its points back (x -> W - 1 - x, each
vertex to its mirror vertex) gives a second reading whose biases are mirrored; their mean cancels the
odd part. Measured in benchmarks/study_open_real.py (docs/open-pack.md): it is what made people's meshes
more distinct there, where refitting a shape model to the points did not.
"""

from __future__ import annotations

import numpy as np

from facefuse.face.align import box_crop_to_image
from facefuse.face.facemesh import NUM_LANDMARKS, FaceMesh, face_roi, project
from facefuse.face.types import AlignedFace


def mirrored_landmarks(mesh: FaceMesh, image_rgb: np.ndarray, box: np.ndarray, left_eye: np.ndarray,
                       right_eye: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """(468, 3) FaceMesh points of the horizontally flipped image, mapped back into ``image_rgb``'s pixels
    and re-indexed by ``mirror`` (vertex -> its mirror vertex), so vertex i is the same point of the face
    as in an ordinary run. ``box`` (x0, y0, x1, y1) and the eye key-points are in ``image_rgb``'s pixels."""
    width = image_rgb.shape[1]
    flipped = np.ascontiguousarray(np.asarray(image_rgb)[:, ::-1])
    x0, y0, x1, y1 = np.asarray(box, np.float64)
    flipped_box = np.array([width - 1 - x1, y0, width - 1 - x0, y1])

    def flip(point: np.ndarray) -> np.ndarray:
        return np.array([width - 1 - float(point[0]), float(point[1])])

    # the subject's eyes swap sides in the mirror image: keep the ROI's angle along image-left -> image-right
    centre, side, angle = face_roi(flipped_box, flip(right_eye), flip(left_eye))
    points = np.asarray(mesh.run(flipped, centre, side, angle).landmarks, np.float64)[:NUM_LANDMARKS].copy()
    points[:, 0] = width - 1 - points[:, 0]
    return points[np.asarray(mirror)]


def mirror_averaged_face_landmarks(mesh: FaceMesh, face: AlignedFace, mirror: np.ndarray) -> np.ndarray | None:
    """(468, 3) photo-pixel landmarks: the mean of the face's own FaceMesh points and the mirrored run on its
    1.6-scale box crop (``AlignedFace.crop_box224``, so no photo is needed); None without a crop (zeros)."""
    if not np.any(face.crop_box224) or face.detection.landmarks is None:
        return None
    from facefuse.face.imputation import image_to_crop

    crop_to_image = box_crop_to_image(face.detection.box)
    crop = np.asarray(face.crop_box224, np.float32) * np.float32(255.0)
    box = image_to_crop(crop_to_image, np.asarray(face.detection.box, np.float64).reshape(2, 2)).reshape(4)
    eyes = image_to_crop(crop_to_image, np.asarray(face.detection.kps5, np.float64)[:2])
    in_crop = mirrored_landmarks(mesh, crop, box, eyes[0], eyes[1], mirror)
    mirrored = np.asarray(project(in_crop, crop_to_image), np.float64)
    own = np.asarray(face.detection.landmarks, np.float64)[:NUM_LANDMARKS, :3]
    return 0.5 * (own + mirrored)
