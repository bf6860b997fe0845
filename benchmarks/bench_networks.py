"""Per network: ms per forward of the shipped layers ("before") vs the fast-numerics layers ("after").

Before and after run interleaved in one process (before, after, before, after, ...) so that load from
other work on a shared machine hits both alike; the table gives the median and the best of the runs,
and the max deviation of the outputs. Weights are synthetic in the official formats (speed does not
depend on the values). Candidates that were measured but not adopted can be timed too (--candidates):
ONNX Runtime for ArcFace and the Unet, and PyTorch's fused multi-head-attention path for the FaRL ViT.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_networks.py [--repeats 7] [--threads 0] [--candidates]
        [--networks arcface,unet1,unet10,unet100,vit,ofer]   (ofer: one face through the OFER backend)
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from facefuse.assets.synthetic.mica import arcface_state
from facefuse.assets.synthetic.ofer_idgen import STRAY_QKV_SUFFIX, idgen_net_state
from facefuse.client.quality import QUALITY_PRESETS
from facefuse.models.arcface import IResNet100, fused_for_inference
from facefuse.models.clip_vit import ClipViT
from facefuse.models.idgen import IdGenUnet, draw_default_projections

Forward = Callable[[], torch.Tensor]


def interleaved(variants: dict[str, Forward], repeats: int) -> dict[str, list[float]]:
    """ms per call of each variant, the variants taking turns; one untimed warm-up call each."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for forward in variants.values():
            forward()
        for _ in range(repeats):
            for name, forward in variants.items():
                start = time.perf_counter()
                forward()
                times[name].append(1e3 * (time.perf_counter() - start))
    return times


def report(network: str, variants: dict[str, Forward], repeats: int) -> None:
    with torch.inference_mode():
        outputs = {name: forward().float() for name, forward in variants.items()}
    reference = outputs["before"]
    times = interleaved(variants, repeats)
    base = statistics.median(times["before"])
    for name, values in times.items():
        median = statistics.median(values)
        deviation = float((outputs[name] - reference).abs().max())
        print(f"{network:<30}{name:<24}{median:>10.1f}{min(values):>10.1f}{base / median:>9.2f}x"
              f"{deviation:>12.2e}{float(reference.abs().max()):>10.2f}")


def arcface_variants(candidates: bool) -> dict[str, Forward]:
    model = IResNet100()
    model.load_state_dict(arcface_state(torch.Generator().manual_seed(2)), strict=True)
    model.eval()
    fused = fused_for_inference(model)
    blob = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    variants: dict[str, Forward] = {
        "before": lambda: F.normalize(model(blob), dim=1),
        "after (fused, NHWC)": lambda: F.normalize(fused(blob), dim=1),
    }
    if candidates:
        fused_nchw = fused_for_inference(model, channels_last=False)
        nhwc_only = copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        nhwc_only.channels_last = True
        variants["fused, NCHW"] = lambda: F.normalize(fused_nchw(blob), dim=1)
        variants["NHWC, not fused"] = lambda: F.normalize(nhwc_only(blob), dim=1)
        session = onnx_session(_EmbeddingOnly(model).eval(), (blob,))  # export restores the wrapper's mode
        if session is not None:
            feed = {session.get_inputs()[0].name: blob.numpy()}
            variants["onnxruntime"] = lambda: F.normalize(torch.from_numpy(session.run(None, feed)[0]), dim=1)
    return variants


class _EmbeddingOnly(torch.nn.Module):
    """ArcFace with ``apply_features`` fixed (the ONNX exporter passes positional inputs only)."""

    def __init__(self, model: IResNet100) -> None:
        super().__init__()
        self.model = model

    def forward(self, blob: torch.Tensor) -> torch.Tensor:
        return self.model(blob, apply_features=True)


def unet_variants(batch: int, candidates: bool) -> dict[str, Forward]:
    state = {k: v for k, v in idgen_net_state(torch.Generator().manual_seed(4)).items()
             if not k.endswith(STRAY_QKV_SUFFIX)}
    net = IdGenUnet()
    net.load_state_dict(state, strict=True)
    net.set_projections(draw_default_projections(torch.Generator().manual_seed(0)))
    net.eval()
    fast = copy.deepcopy(net).use_matmul(True)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(batch, 300, generator=g), torch.full((batch,), 500, dtype=torch.long)
    context = F.normalize(torch.randn(batch, 512, generator=g), dim=1)
    variants: dict[str, Forward] = {
        "before": lambda: net(x, t, context),
        "after (matmul)": lambda: fast(x, t, context),
    }
    if candidates:
        session = onnx_session(net, (x, t, context))
        if session is not None:
            names = [i.name for i in session.get_inputs()]
            feed = dict(zip(names, (x.numpy(), t.numpy(), context.numpy()), strict=True))
            variants["onnxruntime"] = lambda: torch.from_numpy(session.run(None, feed)[0])
    return variants


def vit_variants(candidates: bool) -> dict[str, Forward]:
    torch.manual_seed(0)  # ClipViT's construction replays the official init on the global RNG
    model = ClipViT().eval()
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    variants: dict[str, Forward] = {"before": lambda: model.encode_image(image)}
    if candidates:
        visual = copy.deepcopy(model.visual)
        for block in visual.transformer.resblocks:
            block.attn.batch_first = True  # lets nn.MultiheadAttention take its fused inference path

        def batch_first() -> torch.Tensor:
            x = visual.conv1(image)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
            x = visual.ln_pre(torch.cat([cls, x], dim=1) + visual.positional_embedding)
            return visual.ln_post(visual.transformer(x)[:, 0, :]) @ visual.proj

        variants["fused MHA (batch-first)"] = batch_first
    return variants


def ofer_face_variants(quality_steps: int) -> dict[str, Forward]:
    """One face through the OFER backend (IdGen sampling N=10 + IdRank scoring), synthetic assets:
    reproduce-official layers vs fast layers at 40 steps, and fast layers with the ``fast`` preset."""
    import tempfile
    from pathlib import Path
    from types import SimpleNamespace

    from facefuse.assets.synthetic import synthesize
    from facefuse.packs.flame import NUMERICS_ENV, OferBackend

    directory = Path(tempfile.mkdtemp(prefix="bench-networks-"))
    synthesize(directory, size="full", seed=0)
    previous = os.environ.get(NUMERICS_ENV)
    backends = {}
    for mode in ("reproduce-official", "fast"):
        os.environ[NUMERICS_ENV] = mode
        backends[mode] = OferBackend.from_assets(directory, "cpu")
    if previous is None:
        os.environ.pop(NUMERICS_ENV)
    else:
        os.environ[NUMERICS_ENV] = previous
    g = torch.Generator().manual_seed(7)
    face = SimpleNamespace(arcface_blob=torch.randn(3, 112, 112, generator=g).numpy(),
                           farl_input=torch.randn(3, 224, 224, generator=g).numpy())

    def one_face(backend: OferBackend, steps: int) -> Forward:
        def run() -> torch.Tensor:
            samples = backend.sample(face, 10, mode="fast", steps=steps, seed=1,  # type: ignore[arg-type]
                                     start_shape=None, start_t0=0, guide_shape=None, guide_strength=0.0)
            scores = backend.rank(face, samples)  # type: ignore[arg-type]
            return torch.from_numpy(samples).sum(dim=1) + 0 * torch.from_numpy(scores)

        return run

    return {
        "before": one_face(backends["reproduce-official"], 40),
        "after (40 steps)": one_face(backends["fast"], 40),
        f"after, --quality fast ({quality_steps})": one_face(backends["fast"], quality_steps),
    }


def onnx_session(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]):  # -> onnxruntime session or None
    try:
        import onnxruntime

        buffer = io.BytesIO()
        torch.onnx.export(model, inputs, buffer, dynamo=False, opset_version=17)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # a candidate that cannot be built is reported, not fatal
        print(f"  (onnxruntime candidate unavailable for {type(model).__name__}: {type(error).__name__}: {error})")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--candidates", action="store_true", help="also time the candidates not adopted")
    parser.add_argument("--networks", default="arcface,unet1,unet10,vit")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average at start {os.getloadavg()[0]:.1f}")
    print(f"{'network':<30}{'variant':<24}{'median ms':>10}{'best ms':>10}{'speed-up':>10}"
          f"{'max |Δ|':>12}{'max |out|':>10}")
    builders: dict[str, tuple[str, Callable[[], dict[str, Forward]]]] = {
        "arcface": ("ArcFace R100 (B=1, unit emb.)", lambda: arcface_variants(args.candidates)),
        "unet1": ("IdGen Unet (B=1)", lambda: unet_variants(1, args.candidates)),
        "unet10": ("IdGen Unet (B=10)", lambda: unet_variants(10, args.candidates)),
        "unet100": ("IdGen Unet (B=100)", lambda: unet_variants(100, args.candidates)),
        "vit": ("FaRL ViT-B/16 (B=1)", lambda: vit_variants(args.candidates)),
        "ofer": ("OFER face (N=10, sample+rank)", lambda: ofer_face_variants(QUALITY_PRESETS["fast"].steps)),
    }
    for key in [k for k in args.networks.split(",") if k]:
        label, build = builders[key]
        report(label, build(), args.repeats)


if __name__ == "__main__":
    main()
