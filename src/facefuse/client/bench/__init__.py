"""The benchmark application: benchmarks through the mesh: NoW per method and fusion strategy, and occlusion robustness.

Both benchmarks share one way of getting predictions, built so that comparing strategies costs one
pass of the expensive branches:

* **branch pass**: each image goes through the gateway once, ``method="fuse"`` with
  ``save_branches``; MICA's output (shape, mesh, 7 NoW points), OFER's samples and IdRank scores and
  the visibility estimate are cached per image (``OUT/cache/branches``);
* **re-fusion**: ``ofer`` and every strategy that only combines the branches (``linear``,
  ``gaussian``, ``region``, ``mica``, ``ofer``) is computed by calling the fusion service's ``Fuse``
  RPC directly with the cached branches: the same request the gateway would send;
* **steering strategies** (``pool``, ``sdedit``, ``guided``) change what the generator samples or
  how the ranker scores, so they need the ofer service again: those go through the gateway once
  more, per strategy.

Every prediction is cached too (``OUT/cache/pred/<entry>``), keyed by the image's bytes, the given
face box, the sampling settings and the mesh's backends, so a rerun resumes: cached items make no
gateway or fusion call. Cache files are npz, written atomically; an unreadable one counts as missing.
"""
