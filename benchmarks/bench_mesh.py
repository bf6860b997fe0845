"""Per-face time through the whole local mesh (gateway + services as processes), per method.

    python benchmarks/bench_mesh.py                 # open pack (no assets)
    python benchmarks/bench_mesh.py --assets DIR    # flame pack (real or synthetic files)

Each timing streams one photo (skimage's astronaut) per request and waits for its result, so it is
latency per face, front end included; the first request of each method is a warm-up.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

import numpy as np

from facefuse.client.api import GatewayClient, ImageInput
from facefuse.servers.local import LocalMesh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--methods", default="detect,mica,ofer,fuse")
    parser.add_argument("--sampler", default="fast", choices=["fast", "official"])
    parser.add_argument("--occluded", action="store_true",
                        help="stream the demo's astronaut with a patch over the mouth (open pack: imputation runs)")
    args = parser.parse_args()
    import skimage.data
    from PIL import Image

    image = skimage.data.astronaut()
    if args.occluded:
        from facefuse.assets.store import ModelStore
        from facefuse.client.demo import occlude_mouth
        from facefuse.face.frontend import FaceFrontEnd

        (det,) = FaceFrontEnd.from_assets(None, ModelStore()).detect(image)
        image = occlude_mouth(image, det.kps5)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG" if args.occluded else "JPEG", quality=92)
    data = buffer.getvalue()
    rows = []
    with LocalMesh(assets=args.assets, env={} if args.assets else {"FACEFUSE_ASSETS": ""}) as mesh, \
            GatewayClient(mesh.gateway_address, timeout_s=3600) as client:
        packs = {b.service: b.pack for b in client.info().backends}
        for method in args.methods.split(","):
            times = []
            for i in range(args.repeats + 1):
                started = time.perf_counter()
                (result,) = list(client.process([ImageInput(f"{method}-{i}", data)], method=method,
                                                num_samples=args.samples, sampler_mode=args.sampler, seed=i))
                if result.status.code != 0:
                    raise SystemExit(f"{method}: {result.status.message}")
                if i:
                    times.append(time.perf_counter() - started)
            rows.append((method, statistics.median(times), min(times)))
    print(f"machine: {os.cpu_count()}-core CPU; packs {packs}; samples {args.samples}; sampler {args.sampler}; "
          f"{'mouth occluded' if args.occluded else 'unoccluded'}")
    print(f"{'method':<10}{'median s/face':>15}{'best s/face':>13}")
    for method, median, best in rows:
        print(f"{method:<10}{median:>15.3f}{best:>13.3f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
