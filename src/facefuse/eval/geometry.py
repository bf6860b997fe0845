"""Exact point-to-surface distances for triangle meshes.

The NoW error is the unsigned distance from every scan vertex to the predicted surface, and the
alignment refinement queries it many times per image, so this is the hot spot of the evaluation.
Every distance returned here is exact (up to float64 rounding): the acceleration structure only
prunes triangles that provably cannot be the closest one.

How the pruning stays exact: each triangle is covered by "anchors", the centroids of a regular
subdivision of the triangle fine enough that every point of the triangle lies within ``anchor_radius``
of one of its anchors. For a query point q and any triangle T, ``dist(q, T) >= min_anchor |q - a| -
anchor_radius``. A k-nearest-anchor query gives candidate triangles and a best distance d; if the k-th
anchor is farther than ``d + anchor_radius``, no triangle outside the candidates can be closer.
Otherwise the point falls back to a ball query of radius ``d + anchor_radius``, which contains an
anchor of every triangle that could beat d. The closest point on one triangle uses the Voronoi-region
test (Ericson, Real-Time Collision Detection, 5.1.5), vectorised over (point, triangle) pairs.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from facefuse.errors import InvalidInputError

_PAIR_CHUNK = 65_536
"""Point-triangle pairs evaluated per vectorised block: small enough for the temporaries to stay in
cache (measured ~1.5x faster than 400k blocks), large enough to amortise numpy call overhead."""


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InvalidInputError(f"{name} must be an (N, 3) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"{name} contains NaN or infinite coordinates")
    return arr


def _closest_on_segments(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Closest points on segments [a, b] to p, row by row; zero-length segments give a."""
    ab = b - a
    denom = np.einsum("ij,ij->i", ab, ab)
    t = np.einsum("ij,ij->i", p - a, ab)
    safe = denom > 0.0
    t = np.where(safe, t / np.where(safe, denom, 1.0), 0.0)
    np.clip(t, 0.0, 1.0, out=t)
    return a + t[:, None] * ab


def _closest_on_degenerate(p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Closest points on zero-area triangles: the best of the three edges."""
    best = _closest_on_segments(p, a, b)
    best_d2 = np.einsum("ij,ij->i", p - best, p - best)
    for s0, s1 in ((b, c), (c, a)):
        cand = _closest_on_segments(p, s0, s1)
        d2 = np.einsum("ij,ij->i", p - cand, p - cand)
        better = d2 < best_d2
        best[better] = cand[better]
        best_d2 = np.where(better, d2, best_d2)
    return best


def _barycentric_of_closest(
    d1: np.ndarray, d2: np.ndarray, ab_ab: np.ndarray, ab_ac: np.ndarray, ac_ac: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients (v, w) of the closest point a + v*ab + w*ac, from the Voronoi region of p.

    d1 = ab.(p-a), d2 = ac.(p-a); the other dot products follow from the triangle's constants
    (Ericson, Real-Time Collision Detection, 5.1.5). Regions are tested from the interior outwards
    so that, for points on a boundary between regions, the later (vertex/edge) answer wins; both
    give the same point there.
    """
    d3 = d1 - ab_ab  # ab.(p-b)
    d4 = d2 - ab_ac  # ac.(p-b)
    d5 = d1 - ab_ac  # ab.(p-c)
    d6 = d2 - ac_ac  # ac.(p-c)
    vc = d1 * d4 - d3 * d2
    vb = d5 * d2 - d1 * d6
    va = d3 * d6 - d5 * d4
    denom = va + vb + vc
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / denom
        v = vb * inv
        w = vc * inv
        # Edge bc.
        e = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
        t = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        v = np.where(e, 1.0 - t, v)
        w = np.where(e, t, w)
        # Edge ac.
        e = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
        t = d2 / (d2 - d6)
        v = np.where(e, 0.0, v)
        w = np.where(e, t, w)
        # Edge ab.
        e = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
        t = d1 / (d1 - d3)
        v = np.where(e, t, v)
        w = np.where(e, 0.0, w)
    # Vertices.
    e = (d6 >= 0) & (d5 <= d6)
    v = np.where(e, 0.0, v)
    w = np.where(e, 1.0, w)
    e = (d3 >= 0) & (d4 <= d3)
    v = np.where(e, 1.0, v)
    w = np.where(e, 0.0, w)
    e = (d1 <= 0) & (d2 <= 0)
    v = np.where(e, 0.0, v)
    w = np.where(e, 0.0, w)
    return v, w


def closest_points_on_triangles(
    points: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Closest point on triangle (a_i, b_i, c_i) to points_i, and the distance, for each row i.

    Zero-area triangles (segments, points) are handled as the union of their edges.
    """
    points = np.asarray(points, dtype=np.float64)
    a, b, c = (np.asarray(x, dtype=np.float64) for x in (a, b, c))
    ab = b - a
    ac = c - a
    ap = points - a
    ab_ab = np.einsum("ij,ij->i", ab, ab)
    ab_ac = np.einsum("ij,ij->i", ab, ac)
    ac_ac = np.einsum("ij,ij->i", ac, ac)
    v, w = _barycentric_of_closest(
        np.einsum("ij,ij->i", ab, ap), np.einsum("ij,ij->i", ac, ap), ab_ab, ab_ac, ac_ac
    )
    closest = a + v[:, None] * ab + w[:, None] * ac
    degenerate = _is_degenerate(ab_ab, ab_ac, ac_ac)
    if np.any(degenerate):
        closest[degenerate] = _closest_on_degenerate(points[degenerate], a[degenerate], b[degenerate], c[degenerate])
    diff = points - closest
    return closest, np.sqrt(np.einsum("ij,ij->i", diff, diff))


def _is_degenerate(ab_ab: np.ndarray, ab_ac: np.ndarray, ac_ac: np.ndarray) -> np.ndarray:
    """Zero or near-zero area (|ab x ac|^2 = |ab|^2 |ac|^2 - (ab.ac)^2, relative to the edge lengths)."""
    area2 = ab_ab * ac_ac - ab_ac * ab_ac
    return area2 <= 1e-12 * ab_ab * ac_ac


@dataclass(frozen=True)
class SurfaceQuery:
    """Result of a closest-point query: one row per query point."""

    distances: np.ndarray  # (N,) unsigned distance to the surface
    closest_points: np.ndarray  # (N, 3) closest points on the surface
    triangle_ids: np.ndarray  # (N,) index of the triangle holding the closest point


class TriangleMeshDistance:
    """Exact unsigned point-to-surface distance for a fixed triangle mesh, many queries."""

    def __init__(
        self,
        vertices: np.ndarray,
        faces: np.ndarray,
        *,
        k_stages: tuple[int, ...] = (12,),
        anchor_fraction: float = 0.5,
        max_subdivision: int = 32,
    ) -> None:
        self.vertices = _as_points(vertices, "mesh vertices")
        faces_arr = np.asarray(faces)
        if faces_arr.ndim != 2 or faces_arr.shape[1] != 3 or faces_arr.shape[0] == 0:
            raise InvalidInputError(f"mesh faces must be a non-empty (F, 3) array, got shape {faces_arr.shape}")
        if faces_arr.min() < 0 or faces_arr.max() >= len(self.vertices):
            raise InvalidInputError(
                f"mesh faces index vertices outside [0, {len(self.vertices)}): "
                f"range {faces_arr.min()}..{faces_arr.max()}"
            )
        self.faces = faces_arr.astype(np.int64)
        self._a = self.vertices[self.faces[:, 0]]
        self._b = self.vertices[self.faces[:, 1]]
        self._c = self.vertices[self.faces[:, 2]]
        self._k_stages = tuple(int(k) for k in k_stages if k >= 1) or (8,)
        # Per-triangle constants, stored component-major so that gathers give contiguous rows.
        ab = self._b - self._a
        ac = self._c - self._a
        self._a_t = np.ascontiguousarray(self._a.T)
        self._ab_t = np.ascontiguousarray(ab.T)
        self._ac_t = np.ascontiguousarray(ac.T)
        self._ab_ab = np.einsum("ij,ij->i", ab, ab)
        self._ab_ac = np.einsum("ij,ij->i", ab, ac)
        self._ac_ac = np.einsum("ij,ij->i", ac, ac)
        self._degenerate = _is_degenerate(self._ab_ab, self._ab_ac, self._ac_ac)
        self._build_anchors(anchor_fraction, max_subdivision)

    def _build_anchors(self, anchor_fraction: float, max_subdivision: int) -> None:
        centroids = (self._a + self._b + self._c) / 3.0
        radii = np.sqrt(
            np.max(
                np.stack([np.sum((p - centroids) ** 2, axis=1) for p in (self._a, self._b, self._c)], axis=1),
                axis=1,
            )
        )
        target = float(np.median(radii)) * anchor_fraction
        if target <= 0.0:
            target = float(radii.max()) if radii.max() > 0 else 1.0
        splits = np.clip(np.ceil(radii / target), 1, max_subdivision).astype(np.int64)
        anchors = [centroids[splits == 1]]
        owners = [np.nonzero(splits == 1)[0]]
        # A regular n x n subdivision has n^2 sub-triangles, each a copy of the triangle scaled by 1/n
        # (some point-reflected), so every sub-triangle lies within radius/n of its own centroid.
        for n in np.unique(splits[splits > 1]):
            ids = np.nonzero(splits == n)[0]
            bary = []
            for i in range(n):
                for j in range(n - i):
                    bary.append(((i + 1 / 3) / n, (j + 1 / 3) / n))  # upward sub-triangle
                    if i + j < n - 1:
                        bary.append(((i + 2 / 3) / n, (j + 2 / 3) / n))  # downward sub-triangle
            bary_arr = np.asarray(bary)
            ab = (self._b - self._a)[ids]
            ac = (self._c - self._a)[ids]
            pts = (
                self._a[ids][:, None, :]
                + bary_arr[None, :, 0, None] * ab[:, None, :]
                + bary_arr[None, :, 1, None] * ac[:, None, :]
            )
            anchors.append(pts.reshape(-1, 3))
            owners.append(np.repeat(ids, len(bary_arr)))
        self._anchor_owner = np.concatenate(owners)
        self.anchor_radius = float(np.max(radii / splits)) * (1.0 + 1e-9) + 1e-12
        self._tree = cKDTree(np.concatenate(anchors, axis=0))

    def _pair_distances(
        self, points: np.ndarray, pair_points: np.ndarray, pair_tris: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        closest = np.empty((len(pair_points), 3))
        dist = np.empty(len(pair_points))
        for s in range(0, len(pair_points), _PAIR_CHUNK):
            sl = slice(s, s + _PAIR_CHUNK)
            closest[sl], dist[sl] = self._pair_block(points, pair_points[sl], pair_tris[sl])
        return closest, dist

    def _pair_block(self, points: np.ndarray, pp: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = points[pp].T  # (3, M)
        a = self._a_t[:, t]
        ab = self._ab_t[:, t]
        ac = self._ac_t[:, t]
        ap = p - a
        d1 = ab[0] * ap[0] + ab[1] * ap[1] + ab[2] * ap[2]
        d2 = ac[0] * ap[0] + ac[1] * ap[1] + ac[2] * ap[2]
        v, w = _barycentric_of_closest(d1, d2, self._ab_ab[t], self._ab_ac[t], self._ac_ac[t])
        closest = a + v * ab + w * ac  # (3, M)
        closest = closest.T.copy()
        degenerate = self._degenerate[t]
        if np.any(degenerate):
            td = t[degenerate]
            closest[degenerate] = _closest_on_degenerate(points[pp[degenerate]], self._a[td], self._b[td], self._c[td])
        diff = points[pp] - closest
        return closest, np.sqrt(np.einsum("ij,ij->i", diff, diff))

    def query(self, points: np.ndarray) -> SurfaceQuery:
        """Exact closest points on the surface for every query point."""
        pts = _as_points(points, "query points")
        n = len(pts)
        best_dist = np.full(n, np.inf)
        best_tri = np.zeros(n, dtype=np.int64)
        best_closest = np.zeros((n, 3))
        todo = np.arange(n)
        # Cascade of k-nearest-anchor queries; each stage settles the points its certificate covers.
        for k in self._k_stages:
            if len(todo) == 0:
                break
            k = min(k, self._tree.n)
            anchor_dist, anchor_idx = self._tree.query(pts[todo], k=k)
            anchor_dist = anchor_dist.reshape(len(todo), k)
            tris = self._anchor_owner[anchor_idx.reshape(len(todo), k)]
            closest, dist = self._pair_distances(pts, np.repeat(todo, k), tris.reshape(-1))
            dist = dist.reshape(len(todo), k)
            pick = np.argmin(dist, axis=1)
            rows = np.arange(len(todo))
            found = dist[rows, pick]
            better = found < best_dist[todo]
            sel = todo[better]
            best_dist[sel] = found[better]
            best_tri[sel] = tris[rows, pick][better]
            best_closest[sel] = closest.reshape(len(todo), k, 3)[rows, pick][better]
            if k == self._tree.n:
                return SurfaceQuery(best_dist, best_closest, best_tri)
            # Every anchor outside the k found is at least the k-th distance away.
            todo = todo[best_dist[todo] > anchor_dist[:, -1] - self.anchor_radius]
        if len(todo):
            # Exact fallback: all anchors within best + anchor_radius, in blocks of bounded size
            # (a point far from the surface can see most of the mesh).
            radii = best_dist[todo] + self.anchor_radius
            counts = np.asarray(self._tree.query_ball_point(pts[todo], radii, return_length=True), dtype=np.int64)
            start = 0
            while start < len(todo):
                stop = start + max(1, int(np.searchsorted(np.cumsum(counts[start:]), 4 * _PAIR_CHUNK, side="right")))
                block = todo[start:stop]
                neighbours = self._tree.query_ball_point(pts[block], radii[start:stop])
                flat = np.fromiter(
                    itertools.chain.from_iterable(neighbours), dtype=np.int64, count=int(counts[start:stop].sum())
                )
                point_of_pair = np.repeat(block, counts[start:stop])
                # Several anchors of one triangle: evaluate each (point, triangle) pair once.
                key = np.unique(point_of_pair * len(self.faces) + self._anchor_owner[flat])
                self._update_best(pts, key // len(self.faces), key % len(self.faces), best_dist, best_tri, best_closest)
                start = stop
        return SurfaceQuery(best_dist, best_closest, best_tri)

    def _update_best(
        self,
        pts: np.ndarray,
        pair_points: np.ndarray,
        pair_tris: np.ndarray,
        best_dist: np.ndarray,
        best_tri: np.ndarray,
        best_closest: np.ndarray,
    ) -> None:
        """Evaluate (point, triangle) pairs and keep, per point, the closest one found so far."""
        closest, dist = self._pair_distances(pts, pair_points, pair_tris)
        order = np.lexsort((dist, pair_points))
        starts = np.r_[0, np.nonzero(np.diff(pair_points[order]))[0] + 1]
        pick = order[starts]
        target = pair_points[pick]
        better = dist[pick] < best_dist[target]
        target, pick = target[better], pick[better]
        best_dist[target] = dist[pick]
        best_tri[target] = pair_tris[pick]
        best_closest[target] = closest[pick]

    def distances(self, points: np.ndarray) -> np.ndarray:
        return self.query(points).distances

    def face_normals(self, triangle_ids: np.ndarray) -> np.ndarray:
        """Unit normals of the given triangles (zero for degenerate ones)."""
        t = np.asarray(triangle_ids)
        normal = np.cross(self._b[t] - self._a[t], self._c[t] - self._a[t])
        norm = np.linalg.norm(normal, axis=1, keepdims=True)
        return np.where(norm > 0, normal / np.where(norm > 0, norm, 1.0), 0.0)

