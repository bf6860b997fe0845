"""MICA time per face on this machine: in process vs through the mica service, batch 1 and 32 clients.

Uses synthetic official-format weights (same network, same cost as the real ones) unless --assets
points at real files.

    python benchmarks/bench_mica.py [--assets DIR] [--device cpu|cuda] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import torch

from facefuse import wire
from facefuse.face.types import AlignedFace, Detection
from facefuse.packs.flame import MicaBackend
from facefuse.servers.base import ServerOptions, start_server
from facefuse.servers.mica import SERVICE_NAME, MicaServicer
from facefuse.v1 import mica_pb2, mica_pb2_grpc


def _face(rng: np.random.Generator) -> AlignedFace:
    det = Detection(box=[0, 0, 100, 100], score=1.0, kps5=np.zeros((5, 2)), detector="bench")
    return AlignedFace(det, np.zeros((112, 112, 3), np.uint8), np.zeros((224, 224, 3), np.uint8),
                       np.zeros((224, 224, 3), np.float32), rng.uniform(-1, 1, (3, 112, 112)).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=Path)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    tmp = None
    if args.assets is None:
        from facefuse.assets.synthetic import synthesize

        tmp = tempfile.TemporaryDirectory()
        synthesize(
            Path(tmp.name),
            size="full",
            only={"FLAME2020/generic_model.pkl", "FLAME2020/landmark_embedding.npy", "mica.tar"},
        )
        args.assets = Path(tmp.name)
    backend = MicaBackend.from_assets(args.assets, args.device)
    rng = np.random.default_rng(0)
    faces = [_face(rng) for _ in range(args.clients)]
    backend.predict(faces[:2])  # warm-up

    rows = []
    t = []
    for _ in range(args.repeats):
        s = time.perf_counter()
        backend.predict(faces[:1])
        t.append(time.perf_counter() - s)
    rows.append(("in process, batch 1", statistics.median(t)))
    t = []
    for _ in range(max(args.repeats // 3, 2)):
        s = time.perf_counter()
        backend.predict(faces)
        t.append((time.perf_counter() - s) / len(faces))
    rows.append((f"in process, batch {len(faces)}", statistics.median(t)))

    servicer = MicaServicer(backend, max_batch=args.clients, batch_wait_s=0.01)
    running = start_server(lambda s: mica_pb2_grpc.add_MicaServiceServicer_to_server(servicer, s), [SERVICE_NAME],
                           ServerOptions(max_workers=args.clients + 4))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = mica_pb2_grpc.MicaServiceStub(channel)
    requests = [
        mica_pb2.PredictRequest(faces=[wire.face_message(f, 0, (100, 100))], return_mesh=True, return_landmarks=True)
        for f in faces
    ]
    stub.Predict(requests[0], timeout=120)
    t = []
    for _ in range(args.repeats):
        s = time.perf_counter()
        stub.Predict(requests[0], timeout=120)
        t.append(time.perf_counter() - s)
    rows.append(("service, 1 client (batch 1)", statistics.median(t)))
    walls = []
    for _ in range(max(args.repeats // 3, 2)):
        threads = [threading.Thread(target=stub.Predict, args=(r,), kwargs={"timeout": 600}) for r in requests]
        s = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        walls.append((time.perf_counter() - s) / len(requests))
    rows.append((f"service, {len(requests)} concurrent clients (dynamic batching)", statistics.median(walls)))
    channel.close()
    running.stop(0)

    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()}-core CPU"
    print(
        f"device: {args.device} ({where}), torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"largest batch seen {servicer.batcher.largest_batch}"
    )
    print(f"{'setting':<58}{'ms per face':>12}")
    for name, seconds in rows:
        print(f"{name:<58}{seconds * 1000:>12.1f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
