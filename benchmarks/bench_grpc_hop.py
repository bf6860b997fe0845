"""Cost of one hop: a 300-float shape + a 5023x3 FLAME mesh over gRPC (raw tensor bytes) vs JSON over HTTP.

The JSON side is the seed project's way (float arrays as JSON lists, one HTTP POST per face), served
by the standard library's threading HTTP server with keep-alive; Flask would only add to its time.
Also measures the gateway front end per face (in process and through a local gateway).

    python benchmarks/bench_grpc_hop.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import platform
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from facefuse import wire
from facefuse.packs.base import BackendStatus, ShapeResult
from facefuse.servers.base import ServerOptions, start_server
from facefuse.servers.mica import SERVICE_NAME, MicaServicer
from facefuse.v1 import common_pb2, mica_pb2, mica_pb2_grpc

RNG = np.random.default_rng(0)
SHAPE = RNG.standard_normal(300).astype(np.float32)
VERTICES = (RNG.standard_normal((5023, 3)) * 50).astype(np.float32)
FACES = RNG.integers(0, 5023, (9976, 3)).astype(np.int32)
BLOB = RNG.standard_normal((3, 112, 112)).astype(np.float32)


class FixedBackend:
    status = BackendStatus("mica", "fixed", "bench", True, False, "ready")

    def predict(self, faces):
        return [ShapeResult(VERTICES, FACES, "flame2020", shape=SHAPE) for _ in faces]


def bench_grpc(repeats: int) -> list[float]:
    import grpc

    servicer = MicaServicer(FixedBackend(), max_batch=1, batch_wait_s=0.0)
    running = start_server(
        lambda s: mica_pb2_grpc.add_MicaServiceServicer_to_server(servicer, s), [SERVICE_NAME], ServerOptions()
    )
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = mica_pb2_grpc.MicaServiceStub(channel)
    request = mica_pb2.PredictRequest(faces=[common_pb2.Face(arcface_blob=wire.from_numpy(BLOB))], return_mesh=True)
    times = []
    for i in range(repeats + 10):
        t = time.perf_counter()
        reply = stub.Predict(request, timeout=10)
        shape = wire.to_numpy(reply.predictions[0].shape)
        vertices = wire.to_numpy(reply.predictions[0].mesh.vertices)
        faces = wire.to_numpy(reply.predictions[0].mesh.faces)
        if i >= 10:
            times.append(time.perf_counter() - t)
    assert np.array_equal(shape, SHAPE) and np.array_equal(vertices, VERTICES) and np.array_equal(faces, FACES)
    channel.close()
    running.stop(0)
    return times


class JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # http.server names the handler
        body = self.rfile.read(int(self.headers["Content-Length"]))
        blob = np.asarray(json.loads(body)["arcface"], dtype=np.float32)
        assert blob.shape == (3, 112, 112)
        payload = json.dumps({"shape": SHAPE.tolist(), "vertices": VERTICES.tolist(), "faces": FACES.tolist()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


def bench_json(repeats: int) -> list[float]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), JsonHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    times = []
    for i in range(repeats + 10):
        t = time.perf_counter()
        conn.request(
            "POST", "/infer", body=json.dumps({"arcface": BLOB.tolist()}), headers={"Content-Type": "application/json"}
        )
        reply = json.loads(conn.getresponse().read())
        shape = np.asarray(reply["shape"], np.float32)
        vertices = np.asarray(reply["vertices"], np.float32)
        faces = np.asarray(reply["faces"], np.int32)
        if i >= 10:
            times.append(time.perf_counter() - t)
    assert np.array_equal(shape, SHAPE) and np.array_equal(vertices, VERTICES) and np.array_equal(faces, FACES)
    server.shutdown()
    return times


def bench_front_end(repeats: int) -> dict[str, float]:
    from pathlib import Path

    import insightface
    import skimage.data

    from facefuse.assets.store import ModelStore
    from facefuse.face.frontend import FaceFrontEnd
    from facefuse.io.images import decode_image

    front = FaceFrontEnd.from_assets(None, ModelStore())
    photos = {"astronaut (1 face)": skimage.data.astronaut(),
              "t1.jpg (6 faces)": decode_image((Path(insightface.__file__).parent / "data/images/t1.jpg").read_bytes())}
    out = {}
    for name, image in photos.items():
        runs = []
        for _ in range(max(repeats // 20, 5)):
            t = time.perf_counter()
            dets = front.detect(image)
            for det in dets:
                front.align(image, det)
            runs.append((time.perf_counter() - t) / max(len(dets), 1))
        out[name] = statistics.median(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    grpc_t = bench_grpc(args.repeats)
    json_t = bench_json(args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, Python "
          f"{platform.python_version()}")
    print("payload: request 3x112x112 float32 blob; reply 300-float shape + 5023x3 float32 "
          "vertices + 9976x3 int32 faces")
    print(f"{'transport':<34}{'median ms':>10}{'p90 ms':>10}")
    for name, times in (("gRPC, raw tensor bytes", grpc_t), ("HTTP/1.1 + JSON float lists", json_t)):
        ms = sorted(t * 1000 for t in times)
        print(f"{name:<34}{statistics.median(ms):>10.2f}{ms[int(0.9 * len(ms))]:>10.2f}")
    print(f"JSON / gRPC median ratio: {statistics.median(json_t) / statistics.median(grpc_t):.1f}x")
    for name, seconds in bench_front_end(args.repeats).items():
        print(f"front end (BlazeFace + FaceMesh + align), {name}: {seconds * 1000:.1f} ms per face")


if __name__ == "__main__":
    main()
