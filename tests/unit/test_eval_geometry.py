"""Exact point-to-triangle distances: known answers by construction, and brute force over meshes."""

from __future__ import annotations

import numpy as np
import pytest

from facefuse.errors import InvalidInputError
from facefuse.eval.geometry import TriangleMeshDistance, closest_points_on_triangles


def reference_closest(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Independent reference: the best of the plane projection (if inside) and the three edges."""
    candidates = []
    n = np.cross(b - a, c - a)
    nn = float(n @ n)
    if nn > 1e-20:
        proj = p - ((p - a) @ n) / nn * n
        # Inside test by signed sub-areas.
        signs = [np.cross(q1 - q0, proj - q0) @ n for q0, q1 in ((a, b), (b, c), (c, a))]
        if all(s >= 0 for s in signs):
            candidates.append(proj)
    for q0, q1 in ((a, b), (b, c), (c, a)):
        e = q1 - q0
        ee = float(e @ e)
        t = 0.0 if ee == 0 else min(1.0, max(0.0, float((p - q0) @ e) / ee))
        candidates.append(q0 + t * e)
    candidates.append(a)
    return min(candidates, key=lambda q: float((p - q) @ (p - q)))


def brute_force(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """The reference above, vectorised over all triangles for each point; minimum per point."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    n = np.cross(b - a, c - a)
    nn = np.einsum("ij,ij->i", n, n)
    out = np.empty(len(points))
    for i, p in enumerate(points):
        best = np.full(len(faces), np.inf)
        for q0, q1 in ((a, b), (b, c), (c, a)):
            e = q1 - q0
            ee = np.einsum("ij,ij->i", e, e)
            t = np.clip(np.einsum("ij,ij->i", p - q0, e) / np.where(ee > 0, ee, 1.0), 0.0, 1.0)
            best = np.minimum(best, np.linalg.norm(p - (q0 + t[:, None] * e), axis=1))
        ok = nn > 1e-20
        proj = p - (np.einsum("ij,ij->i", p - a, n) / np.where(ok, nn, 1.0))[:, None] * n
        inside = ok.copy()
        for q0, q1 in ((a, b), (b, c), (c, a)):
            inside &= np.einsum("ij,ij->i", np.cross(q1 - q0, proj - q0), n) >= 0
        best = np.where(inside, np.minimum(best, np.linalg.norm(p - proj, axis=1)), best)
        out[i] = best.min()
    return out


def _random_triangle(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    while True:
        a, b, c = rng.normal(size=(3, 3)) * rng.uniform(0.5, 5.0)
        if np.linalg.norm(np.cross(b - a, c - a)) > 0.1:
            return a, b, c


def test_each_voronoi_region_gives_the_constructed_answer() -> None:
    """Points built so that the nearest feature is known: interior, each edge, each vertex."""
    rng = np.random.default_rng(1)
    pts, tri_a, tri_b, tri_c, expected = [], [], [], [], []
    kinds = []
    for _ in range(300):
        a, b, c = _random_triangle(rng)
        n = np.cross(b - a, c - a)
        n /= np.linalg.norm(n)
        h = rng.uniform(-3, 3)
        # Interior: a strictly inside point, offset along the normal.
        w = rng.dirichlet([2, 2, 2])
        q = w[0] * a + w[1] * b + w[2] * c
        pts.append(q + h * n), expected.append(q), kinds.append("interior")
        # Edges: a point on the edge, pushed outwards in the plane (perpendicular to the edge).
        for (e0, e1, opp) in ((a, b, c), (b, c, a), (c, a, b)):
            t = rng.uniform(0.1, 0.9)
            q = e0 + t * (e1 - e0)
            out = np.cross(e1 - e0, n)
            out /= np.linalg.norm(out)
            if out @ (opp - q) > 0:
                out = -out
            pts.append(q + rng.uniform(0.1, 2) * out + h * n), expected.append(q), kinds.append("edge")
        # Vertices: pushed out along the bisector of the two outward edge directions.
        for (v, v1, v2) in ((a, b, c), (b, c, a), (c, a, b)):
            d = -((v1 - v) / np.linalg.norm(v1 - v) + (v2 - v) / np.linalg.norm(v2 - v))
            d /= np.linalg.norm(d)
            pts.append(v + rng.uniform(0.1, 2) * d + h * n), expected.append(v), kinds.append("vertex")
        for _k in range(7):
            tri_a.append(a), tri_b.append(b), tri_c.append(c)
    pts_arr, exp_arr = np.asarray(pts), np.asarray(expected)
    closest, dist = closest_points_on_triangles(pts_arr, np.asarray(tri_a), np.asarray(tri_b), np.asarray(tri_c))
    np.testing.assert_allclose(closest, exp_arr, atol=1e-9)
    np.testing.assert_allclose(dist, np.linalg.norm(pts_arr - exp_arr, axis=1), atol=1e-9)
    assert {"interior", "edge", "vertex"} == set(kinds)


def test_pairwise_kernel_matches_reference_on_random_pairs() -> None:
    rng = np.random.default_rng(2)
    n = 2000
    a, b, c = (rng.normal(size=(n, 3)) * 3 for _ in range(3))
    # Some degenerate triangles: collinear, and all three corners equal.
    c[:50] = a[:50] + 0.3 * (b[:50] - a[:50])
    b[50:60] = a[50:60]
    c[50:60] = a[50:60]
    p = rng.normal(size=(n, 3)) * 5
    closest, dist = closest_points_on_triangles(p, a, b, c)
    ref = np.array([reference_closest(p[i], a[i], b[i], c[i]) for i in range(n)])
    np.testing.assert_allclose(dist, np.linalg.norm(p - ref, axis=1), atol=1e-9)
    np.testing.assert_allclose(closest, ref, atol=1e-7)


def _bumpy_mesh(rng: np.random.Generator, big: bool) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grid surface; with ``big`` a few huge triangles are added (subdivided anchors)."""
    n = 14
    xs, ys = np.meshgrid(np.linspace(0, 30, n), np.linspace(0, 30, n))
    zs = 3 * np.sin(xs / 5) * np.cos(ys / 7) + rng.normal(0, 0.4, xs.shape)
    v = np.stack([xs.ravel() + rng.normal(0, 0.3, xs.size), ys.ravel(), zs.ravel()], axis=1)
    faces = []
    for i in range(n - 1):
        for j in range(n - 1):
            k = i * n + j
            faces += [[k, k + 1, k + n], [k + 1, k + n + 1, k + n]]
    f = np.asarray(faces)
    if big:
        extra = np.array([[-40.0, -40.0, 10.0], [90.0, -30.0, 12.0], [0.0, 80.0, -15.0]])
        f = np.vstack([f, [[len(v), len(v) + 1, len(v) + 2], [0, 5, len(v)]]])
        v = np.vstack([v, extra])
    return v, f


@pytest.mark.parametrize("big", [False, True])
def test_mesh_query_is_exact_against_brute_force(big: bool) -> None:
    rng = np.random.default_rng(3 + big)
    v, f = _bumpy_mesh(rng, big)
    near = v[rng.integers(0, len(v), 250)] + rng.normal(0, 1.0, (250, 3))
    far = rng.uniform(-60, 90, size=(60, 3))
    pts = np.vstack([near, far])
    surface = TriangleMeshDistance(v, f)
    res = surface.query(pts)
    np.testing.assert_allclose(res.distances, brute_force(pts, v, f), atol=1e-9)
    # The reported closest point lies on the reported triangle and realises the distance.
    np.testing.assert_allclose(np.linalg.norm(pts - res.closest_points, axis=1), res.distances, atol=1e-9)
    tri = v[f[res.triangle_ids]]
    _, d_own = closest_points_on_triangles(res.closest_points, tri[:, 0], tri[:, 1], tri[:, 2])
    assert np.max(d_own) < 1e-9


def test_small_k_still_exact_through_the_fallback() -> None:
    """With k=1 the certificate rarely holds, so nearly every point takes the exact fallback path."""
    rng = np.random.default_rng(5)
    v, f = _bumpy_mesh(rng, big=True)
    pts = v[rng.integers(0, len(v), 150)] + rng.normal(0, 3.0, (150, 3))
    res = TriangleMeshDistance(v, f, k_stages=(1,)).query(pts)
    np.testing.assert_allclose(res.distances, brute_force(pts, v, f), atol=1e-9)


def test_bad_inputs_raise_invalid_input() -> None:
    v = np.zeros((3, 3))
    with pytest.raises(InvalidInputError, match="faces"):
        TriangleMeshDistance(v, np.array([[0, 1, 5]]))
    with pytest.raises(InvalidInputError, match="NaN"):
        TriangleMeshDistance(np.full((3, 3), np.nan), np.array([[0, 1, 2]]))
    surface = TriangleMeshDistance(np.eye(3), np.array([[0, 1, 2]]))
    with pytest.raises(InvalidInputError, match=r"\(N, 3\)"):
        surface.query(np.zeros((4, 2)))
