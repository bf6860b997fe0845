"""Time OFER IdRank per face on this CPU: the context encoders and the scoring, separately.

IdRank per face = one context (FaRL CLIP ViT-B/16 on the 224 crop + ArcFace IResNet-100 on the 112
blob, batch 1) + one scoring of the candidate pool (features + RankMLPNet). Scoring is timed for
N = 10 (gen_mod's pool) and N = 100 (OFER's demo). Weights are synthetic (official shapes; speed
does not depend on the values). Median wall time over repeats, with process CPU time alongside.

    .venv/bin/python benchmarks/bench_idrank.py [--repeats 5] [--threads 0]
"""

from __future__ import annotations

import argparse
import platform

import torch

from facefuse.assets.synthetic.ofer_idrank import synthetic_front_indices, synthetic_idrank_sections
from facefuse.models.idrank import IdRank, rank_features

from timing import timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    generator = torch.Generator().manual_seed(0)
    front = torch.from_numpy(synthetic_front_indices("full", generator))
    with torch.device("meta"):
        model = IdRank(front)
    sections = synthetic_idrank_sections(generator)
    for name, state in sections.items():
        getattr(model, name).load_state_dict(state, strict=True, assign=True)
    model.front_indices = front
    model.eval()

    blob = torch.randn(1, 3, 112, 112, generator=generator)
    image = torch.randn(1, 3, 224, 224, generator=generator)
    context = model.context(blob, image)

    rows: list[tuple[str, float, float]] = []
    with torch.no_grad():
        rows.append(
            ("FaRL CLIP ViT-B/16 encode_image (1x224)", *timed(lambda: model.farl.encode_image(image), args.repeats))
        )
        rows.append(
            ("ArcFace IResNet-100 (1x112)", *timed(lambda: model.arcface(blob, apply_features=True), args.repeats))
        )
        rows.append(("context total (both + concat)", *timed(lambda: model.context(blob, image), args.repeats)))
        for n in (10, 100):
            base = torch.randn(1, 5023, 3, generator=generator) * 0.08
            candidates = base + torch.randn(n, 5023, 3, generator=generator) * 0.003
            rows.append(
                (
                    f"features only, N={n}",
                    *timed(lambda c=candidates: rank_features(c, model.front_indices), args.repeats),
                )
            )
            rows.append(
                (
                    f"score (features + RankMLPNet), N={n}",
                    *timed(lambda c=candidates: model.score(c, context), args.repeats),
                )
            )
    context_wall = rows[2][1]
    print(f"# IdRank on {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'step':44s} {'wall ms':>10s} {'cpu ms':>10s}")
    for name, wall, cpu in rows:
        print(f"{name:44s} {wall * 1e3:10.1f} {cpu * 1e3:10.1f}")
    for n, row in zip((10, 100), (rows[4], rows[6]), strict=True):
        print(f"{f'per face, N={n} (context + score)':44s} {(context_wall + row[1]) * 1e3:10.1f}")


if __name__ == "__main__":
    main()
