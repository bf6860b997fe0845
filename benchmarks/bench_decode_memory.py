"""Peak memory of decoding one image, measured in a fresh process per run, next to what the decode budget charges.

Each run decodes the file once in a new Python process (so earlier allocations cannot hide the peak)
and reports the growth of the peak RSS (VmHWM) over the RSS just before decoding, plus tracemalloc's peak
(numpy and Python objects only: Pillow's and OpenCV's C buffers are invisible to it). ``--code DIR``
decodes with the facefuse found under DIR/src instead of this checkout's, to compare two versions.

    python benchmarks/bench_decode_memory.py [--side 4000x3000] [--code /path/to/other/checkout]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHILD = r"""
import json, sys, tracemalloc
sys.path.insert(0, sys.argv[1])
from facefuse.io import images
import cv2  # imported lazily by the 16-bit path; a module, not decode memory (the gateway has it loaded)
data = open(sys.argv[2], "rb").read()
def status_kib(key):  # VmHWM is this process image's peak RSS (ru_maxrss can carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
before = status_kib("VmRSS")
tracemalloc.start()
limits = {"max_pixels": 10**9} | ({"max_decode_bytes": 2**62} if hasattr(images, "decode_cost_bytes") else {})
out = images.decode_image(data, **limits)
_, traced = tracemalloc.get_traced_memory()
peak = status_kib("VmHWM")
cost = None
if hasattr(images, "decode_cost_bytes"):
    from PIL import Image
    import io
    with Image.open(io.BytesIO(data)) as im:
        cost = images.decode_cost_bytes(im)
print(json.dumps({"rss_growth": (peak - before) * 1024, "traced_peak": traced, "charged": cost, "shape": out.shape}))
"""


def _write_cases(folder: Path, width: int, height: int) -> dict[str, Path]:
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    smooth = ((x * 65535) // max(width - 1, 1)).astype(np.uint16)
    noise = rng.integers(0, 2048, (height, width), dtype=np.uint16)
    c16 = np.stack([smooth, (y * 65535 // max(height - 1, 1)).astype(np.uint16), smooth // 2 + noise,
                    np.full_like(smooth, 50000)], axis=2)
    del y, x
    paths = {}
    for name, array in (("png16_rgba", c16[:, :, [2, 1, 0, 3]]), ("png16_rgb", c16[:, :, 2::-1])):
        paths[name] = folder / f"{name}.png"
        cv2.imwrite(str(paths[name]), np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    rgb8 = (c16[:, :, :3] >> 8).astype(np.uint8)
    paths["jpeg_rgb"] = folder / "jpeg_rgb.jpg"
    Image.fromarray(rgb8).save(paths["jpeg_rgb"], quality=90)
    paths["png_rgba"] = folder / "png_rgba.png"
    Image.fromarray((c16 >> 8).astype(np.uint8), "RGBA").save(paths["png_rgba"], compress_level=1)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", default="4000x3000", help="WIDTHxHEIGHT of the test images")
    parser.add_argument("--code", action="append", default=[], help="another checkout to compare (its src/ is used)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.side.split("x"))
    here = Path(__file__).resolve().parents[1]
    checkouts = [here, *[Path(c).resolve() for c in args.code]]
    print(
        f"# decode peak memory, {width}x{height} = {width * height / 1e6:.1f} M px; "
        f"{platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}"
    )
    print("| image | file | code | RSS growth (MB) | B/px | tracemalloc peak (MB) | charged (MB) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _write_cases(Path(tmp), width, height).items():
            for checkout in checkouts:
                run = subprocess.run([sys.executable, "-c", _CHILD, str(checkout / "src"), str(path)],
                                     capture_output=True, text=True, check=True)
                row = json.loads(run.stdout)
                charged = "-" if row["charged"] is None else f"{row['charged'] / 1e6:.0f}"
                print(
                    f"| {name} | {path.stat().st_size / 1e6:.1f} MB | {checkout.name} | "
                    f"{row['rss_growth'] / 1e6:.0f} | "
                    f"{row['rss_growth'] / (width * height):.1f} | {row['traced_peak'] / 1e6:.0f} | {charged} |"
                )


if __name__ == "__main__":
    main()
