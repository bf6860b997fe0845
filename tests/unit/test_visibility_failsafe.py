"""Visibility that fails safe: no colour evidence is "unknown", not "hidden"; hands are their fingers, not a
hull; a turned head's far side is unseen.

Photos ship with installed packages: skimage's astronaut and insightface's group photo t1.jpg; faces come
from the open front end (BlazeFace + FaceMesh from the model store). Hands are synthetic 21-point MediaPipe
hand landmarks placed in the image, so the geometry under test is known exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from facefuse.assets.canonical_face import load_canonical_face
from facefuse.errors import InvalidInputError
from facefuse.fusion.visibility import (
    REGION_NAMES,
    Visibility,
    VisibilitySources,
    combine,
    hand_mask_from_points,
    region_pixels,
    visibility_from_hands,
    visibility_from_pose,
    visibility_photometric,
)
from facefuse.servers.common import visibility_from_message
from facefuse.v1 import common_pb2

RIGHT_EYE_CORNERS = (33, 133)  # MediaPipe "right_eye" (the subject's right, image left)
MOUTH_CORNERS = (61, 291)


@pytest.fixture(scope="module")
def canonical(store):
    return load_canonical_face(store)


@pytest.fixture(scope="module")
def astronaut(front_end):
    image = skimage.data.astronaut()
    (det,) = front_end.detect(image)
    return image, np.asarray(det.landmarks, np.float64)


@pytest.fixture(scope="module")
def group_photo():
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


def _gray(image: np.ndarray) -> np.ndarray:
    luma = np.rint(image.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    return np.repeat(luma[..., None], 3, axis=2)


def test_grayscale_photo_is_unknown_not_hidden(astronaut):
    image, lmk = astronaut
    colour = visibility_photometric(image, lmk)
    assert colour.unknown == () and all(v > 0.5 for v in colour.regions.values()), colour.regions
    for variant in (_gray(image), np.clip(_gray(image) * [1.0, 0.85, 0.65], 0, 255).astype(np.uint8)):  # B&W, sepia
        vis = visibility_photometric(variant, lmk)
        assert vis.unknown == REGION_NAMES and vis.regions == {r: 1.0 for r in REGION_NAMES}, vis
    # Odd lighting: a strong blue cast leaves the skin gate without support -> unknown too.
    blue = np.clip(image * [0.35, 0.5, 1.0] + [0, 0, 60], 0, 255).astype(np.uint8)
    assert visibility_photometric(blue, lmk).unknown == REGION_NAMES
    # Geometric evidence still counts (a hand over the mouth); the photometric part stays marked unknown.
    hands = Visibility({r: (0.2 if r == "lips" else 1.0) for r in REGION_NAMES}, None, ("hands",))
    merged = combine(visibility_photometric(_gray(image), lmk), hands)
    assert merged.regions == {r: (0.2 if r == "lips" else 1.0) for r in REGION_NAMES}
    assert merged.unknown == REGION_NAMES


def test_grayscale_faces_of_two_people_give_two_shapes(front_end, store, group_photo):
    """The failure this guards against: all regions "hidden" made the open pack return the same prior draw
    for everyone. Unknown regions are observed, so two people's meshes differ as their landmarks do."""
    from facefuse.packs.open import load_open_generative_backend, open_shape_space, vertices_from_shape

    gray = _gray(group_photo)
    faces = [front_end.align(gray, det) for det in front_end.detect(gray)[:2]]
    assert len(faces) == 2
    backend = load_open_generative_backend("cpu", store, imputation=False)
    space = open_shape_space(store)
    meshes, hidden = [], []
    for face in faces:
        vis = VisibilitySources().estimate(gray, face.detection.landmarks)
        assert set(vis.unknown) == set(REGION_NAMES) and vis.overall == 1.0
        weights = np.clip(space.region_weights(vis), 0.0, 1.0)
        meshes.append(vertices_from_shape(backend.sample(face, 1, seed=5, visibility=weights)[0], backend.canonical))
        hidden.append(vertices_from_shape(backend.sample(face, 1, seed=5, visibility=np.zeros(468))[0],
                                          backend.canonical))
    # The old behaviour for contrast: everything hidden -> the very same prior draw for both people.
    np.testing.assert_allclose(hidden[0], hidden[1], atol=1e-6)
    rms = float(np.sqrt(((meshes[0] - meshes[1]) ** 2).sum(axis=1).mean()))
    assert rms > 1.0, rms
    for face, mesh in zip(faces, meshes, strict=True):  # and each follows its own observation
        observed = backend.shape_backend.reconstruct(face).vertices_mm
        assert float(np.sqrt(((mesh - observed) ** 2).sum(axis=1).mean())) < 0.5 * rms


def _ring_hand(lmk: np.ndarray) -> tuple[np.ndarray, float]:
    """21 hand points whose thumb and index finger form a ring around the right eye (an "OK" sign held
    to the eye); the other fingers curl away below it. Returns the points and the ring's radius."""
    xy = lmk[:, :2]
    eye = xy[list(RIGHT_EYE_CORNERS)].mean(axis=0)
    region = np.concatenate([xy[i][None] for i in (35, 124, 46, 53, 52, 65, 55, 226, 233, 244, 33, 133)])
    radius = 1.45 * float(np.max(np.linalg.norm(region - eye, axis=1)))

    def on_ring(deg: float) -> np.ndarray:
        a = np.deg2rad(deg)
        return eye + radius * np.array([np.cos(a), np.sin(a)])  # image y down: 90 degrees is below the eye

    wrist = eye + radius * np.array([-1.3, 2.3])
    points = np.zeros((21, 2))
    points[0] = wrist
    points[1:5] = [on_ring(d) for d in (112, 78, 45, 15)]  # thumb: along the bottom to the far side
    points[5:9] = [on_ring(d) for d in (150, 215, 275, 335)]  # index: over the top to meet the thumb
    base = points[5]
    for k, start in enumerate((9, 13, 17)):  # middle, ring and little finger: knuckles below, curled down
        knuckle = base + radius * np.array([-0.15 - 0.25 * k, 0.35 + 0.3 * k])
        points[start] = knuckle
        points[start + 1:start + 4] = [knuckle + radius * np.array([0.25 * j, 0.35 * j]) for j in (1, 2, 3)]
    return points, radius


def test_a_ring_of_fingers_leaves_the_eye_visible(astronaut):
    image, lmk = astronaut
    hand, radius = _ring_hand(lmk)
    fingers = hand_mask_from_points([hand], image.shape)
    hull = hand_mask_from_points([hand], image.shape, model="hull")
    rows, cols, _ = region_pixels(lmk, image.shape)["right_eye"]
    assert fingers[rows, cols].mean() < 0.1  # the eye shows through the ring
    assert hull[rows, cols].mean() > 0.9  # a hull would have hidden it
    eye = lmk[list(RIGHT_EYE_CORNERS), :2].mean(axis=0)
    top = np.rint(eye + np.array([0.0, -radius])).astype(int)
    assert fingers[top[1], top[0]]  # the index finger itself is covered
    vis = visibility_from_hands(lmk, image.shape, hand_points=[hand])
    assert vis.regions["right_eye"] > 0.9, vis.regions
    with pytest.raises(InvalidInputError, match="model"):
        hand_mask_from_points([hand], image.shape, model="blob")


def _flat_hand_over_mouth(lmk: np.ndarray) -> np.ndarray:
    """21 points of a flat hand held across the mouth, fingers pointing to the image's right."""
    left, right = lmk[MOUTH_CORNERS[0], :2], lmk[MOUTH_CORNERS[1], :2]
    width = float(np.linalg.norm(right - left))
    centre = (left + right) / 2.0
    wrist = centre + np.array([-1.3 * width, 0.0])
    points = np.zeros((21, 2))
    points[0] = wrist
    points[1:5] = [wrist + np.array([0.3 * width * j, -0.35 * width - 0.1 * width * j]) for j in (1, 2, 3, 4)]
    for k, start in enumerate((5, 9, 13, 17)):  # the four fingers side by side across the lips
        knuckle = centre + np.array([-0.4 * width, (k - 1.5) * 0.22 * width])
        points[start:start + 4] = [knuckle + np.array([0.35 * width * j, 0.0]) for j in range(4)]
    return points


def test_a_skin_coloured_hand_is_caught_by_its_landmarks(astronaut):
    image, lmk = astronaut
    hand = _flat_hand_over_mouth(lmk)
    mask = hand_mask_from_points([hand], image.shape)
    rows, cols, _ = region_pixels(lmk, image.shape)["left_cheek"]
    skin = np.median(image[rows, cols], axis=0)
    painted = image.copy()
    noise = np.random.default_rng(0).normal(0.0, 3.0, (int(mask.sum()), 3))
    painted[mask] = np.clip(skin + noise, 0, 255).astype(np.uint8)
    photometric = visibility_photometric(painted, lmk)
    assert photometric.regions["lips"] > 0.5  # the skin test is fooled: the hand looks like skin
    vis = VisibilitySources().estimate(painted, lmk, hand_points=[hand])
    assert vis.regions["lips"] < 0.3 and "hands" in vis.sources, vis.regions
    assert vis.regions["forehead"] > 0.9 and vis.regions["left_eye"] > 0.9


def _yawed(lmk: np.ndarray, deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    rot = np.array([[np.cos(a), 0.0, np.sin(a)], [0.0, 1.0, 0.0], [-np.sin(a), 0.0, np.cos(a)]])
    centre = lmk.mean(axis=0)
    return (lmk - centre) @ rot.T + centre


def test_a_turned_head_marks_its_far_side_unseen(astronaut, canonical):
    _, lmk = astronaut
    frontal = visibility_from_pose(lmk, canonical.faces, canonical.vertices_mm)
    assert frontal.sources == ("pose",) and all(v > 0.9 for v in frontal.regions.values()), frontal.regions
    for deg in (60.0, -60.0):
        turned = _yawed(lmk, deg)
        vis = visibility_from_pose(turned, canonical.faces, canonical.vertices_mm)
        # The far side is the one whose cheek went deeper (FaceMesh z: larger = farther from the camera).
        depth = {side: turned[[93, 132, 58, 205] if side == "right" else [323, 361, 288, 425], 2].mean()
                 for side in ("right", "left")}
        far, near = ("right", "left") if depth["right"] > depth["left"] else ("left", "right")
        assert vis.regions[f"{far}_cheek"] < 0.35 and vis.regions[f"{far}_eye"] < 0.7, (deg, vis.regions)
        assert vis.regions[f"{near}_cheek"] > 0.95 and vis.regions[f"{near}_eye"] > 0.95, (deg, vis.regions)
    # Through the sources, with the other evidence: the pose source joins in when it has its inputs.
    image = skimage.data.astronaut()
    both = VisibilitySources().estimate(image, _yawed(lmk, 60.0), triangles=canonical.faces,
                                        canonical_mm=canonical.vertices_mm)
    assert "pose" in both.sources and min(both.regions.values()) < 0.35
    off = VisibilitySources(pose=False).estimate(image, lmk, triangles=canonical.faces,
                                                  canonical_mm=canonical.vertices_mm)
    assert "pose" not in off.sources


def test_services_check_unknown_regions():
    good = common_pb2.Visibility(regions={"lips": 1.0, "nose": 0.3}, sources=["photometric"], unknown=["lips"])
    assert visibility_from_message(good).unknown == ("lips",)
    with pytest.raises(InvalidInputError, match="unknown"):
        visibility_from_message(common_pb2.Visibility(regions={"lips": 1.0}, unknown=["elbow"]))


def test_points_behind_the_surface():
    from facefuse.fusion.visibility import behind_surface

    # One big triangle near the camera (z = 10) and three points: behind it, in front of it, beside it.
    xyz = np.array([[0.0, 0.0, 10.0], [100.0, 0.0, 10.0], [0.0, 100.0, 10.0],
                    [20.0, 20.0, 0.0], [20.0, 20.0, 20.0], [90.0, 90.0, 0.0]])
    hidden = behind_surface(xyz, np.array([[0, 1, 2]]))
    assert hidden.tolist() == [False, False, False, True, False, False]
