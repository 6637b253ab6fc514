"""The live demo (python -m captioner.demo): its one batched function captions a photo exactly as
python -m captioner.caption does, whoever else is in the batch; every bad request gets its message
and the next is served; a missing or broken checkpoint stops it at start-up in one line; the
server batches concurrent requests, and its page works in headless Chromium. Untrained
checkpoints, tiny images, CPU only."""
from __future__ import annotations

import base64
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.decoding.captioner import Captioner
from captioner.serving.replies import CONTROLS, Demo
from captioner.training.checkpoint import save_checkpoint
from conftest import compose_config
from test_caption import CHROMIUM, untrained_checkpoint
from trainrun import env

GREEDY = {"method": "greedy", "beam_size": 3, "length_penalty": "none", "n_best": 1, "temperature": 1.0, "top_k": 0,
          "top_p": 1.0}
SETTINGS = {"greedy": GREEDY,
            "beam": {**GREEDY, "method": "beam", "beam_size": 4, "length_penalty": "gnmt", "n_best": 3},
            "sample": {**GREEDY, "method": "sample", "temperature": 0.7, "top_k": 5, "top_p": 0.9}}


def discerning_checkpoint(path: Path) -> Path:
    """An untrained checkpoint whose captions tell photos apart, so that a reply handed to the
    wrong request shows: the random encoder's features are tiny (about 1e-9; kept in float32,
    where float16 rounds them to 0), and its image projection is scaled up until they move the
    words and the scores."""
    untrained_checkpoint(path, "encoder.cache_dtype=float32")
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["image_proj.weight"] *= 1e10
    save_checkpoint(path, ckpt)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    return {"show_tell": discerning_checkpoint(folder / "st.pt"),
            "attention": untrained_checkpoint(folder / "att.pt", "model=show_attend_tell", "model.attention_dim=8")}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """Three different small photos, each in a folder of its own (for captioner.caption)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for i, (height, width) in enumerate([(40, 56), (64, 48), (30, 30)]):
        (root / str(i)).mkdir()
        paths.append(root / str(i) / f"photo{i}.png")
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def captioners(checkpoints) -> dict[str, Captioner]:
    return {name: Captioner.from_checkpoint(path, "cpu") for name, path in checkpoints.items()}


def make_demo(captioners: dict[str, Captioner], *names: str, overrides=()) -> Demo:
    cfg = compose_config("demo", ["checkpoint=unused.pt", *overrides])
    return Demo({name: captioners[name] for name in names}, cfg.decode, cfg.demo)


def ask(demo: Demo, *requests: tuple) -> list[list]:
    """``demo``'s function called as Gradio's queue calls it (a list per input): each request is
    (photo path or None, settings)."""
    payloads = [None if photo is None else {"path": str(photo), "orig_name": photo.name} for photo, _ in requests]
    return demo(payloads, *([settings[name] for _, settings in requests] for name in CONTROLS))


def caption_command(photo: Path, checkpoint: Path, settings: dict, tmp_path: Path, *extra: str) -> dict:
    """What ``captioner.caption`` writes for ``photo`` (alone in its folder) with ``settings``."""
    from captioner.caption import caption_folder

    decode = [f"decode={settings['method']}"] + [f"decode.{k}={v}" for k, v in settings.items() if k != "method"]
    cfg = compose_config("caption", [f"folder={photo.parent}", f"checkpoint={checkpoint}", "progress=false",
                                     f"output={tmp_path / 'captions.json'}", *decode, *extra])
    return caption_folder(cfg)


# --- the function behind the page -------------------------------------------------------------

@pytest.mark.parametrize("method", SETTINGS)
def test_a_photo_is_captioned_as_the_caption_command_captions_it(method, checkpoints, captioners, photos, tmp_path):
    settings = SETTINGS[method]
    demo = make_demo(captioners, "show_tell")
    # in a batch with two other photos, as concurrent visitors' requests arrive
    messages, captions, tables = ask(demo, *[(photo, settings) for photo in photos])
    assert messages == ["", "", ""]
    for i, photo in enumerate(photos):
        (expected,) = caption_command(photo, checkpoints["show_tell"], settings, tmp_path)["captions"]
        assert captions[i] == expected["caption"]
        n_best = expected.get("n_best", [expected])
        assert tables[i] == [[c["caption"], c["score"]] for c in n_best]
        assert len(tables[i]) == (settings["n_best"] if method == "beam" else 1)


@pytest.mark.slow
def test_a_photo_is_captioned_as_the_caption_command_line_captions_it(checkpoints, captioners, photos, tmp_path):
    settings = SETTINGS["beam"]
    proc = subprocess.run([sys.executable, "-m", "captioner.caption", str(photos[0].parent),
                           f"checkpoint={checkpoints['show_tell']}", "progress=false", f"output={tmp_path / 'c.json'}",
                           "decode=beam", *[f"decode.{k}={v}" for k, v in settings.items() if k != "method"]],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (expected,) = json.loads((tmp_path / "c.json").read_text())
    _, captions, tables = ask(make_demo(captioners, "show_tell"), (photos[0], settings), (photos[1], settings))
    assert captions[0] == expected["caption"]
    assert tables[0] == [[c["caption"], c["score"]] for c in expected["n_best"]]


def test_checkpoints_side_by_side_and_the_attention_strip_of_the_caption_command(checkpoints, captioners, photos,
                                                                                  tmp_path):
    demo = make_demo(captioners, "show_tell", "attention")
    columns = ask(demo, (photos[0], GREEDY), (photos[1], GREEDY))
    assert len(columns) == 1 + 2 + 3  # message; caption and n-best; caption, n-best and strip
    alone = ask(make_demo(captioners, "show_tell"), (photos[0], GREEDY), (photos[1], GREEDY))
    assert columns[1:3] == alone[1:3]  # a checkpoint's captions do not depend on its neighbour
    for i, photo in enumerate(photos[:2]):
        summary = caption_command(photo, checkpoints["attention"], GREEDY, tmp_path / str(i), "attention=true")
        assert columns[3][i] == summary["captions"][0]["caption"]
        with Image.open(summary["attention"] / f"{photo.name}.png") as png:
            assert np.array_equal(np.asarray(columns[5][i]), np.asarray(png.convert("RGB")))


def png_of_zeros(path: Path, width: int, height: int) -> Path:
    """A valid black 1-bit PNG of any size in a few kilobytes: how a decompression bomb is made."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\0" * (1 + (width + 7) // 8) * height, 1)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


def bad_photo(case: str, folder: Path):
    if case == "no photo":
        return None
    path = folder / {"not an image": "notes.jpg", "truncated JPEG": "cut.jpg", "decompression bomb": "bomb.png",
                     "too many pixels": "huge.png", "1 x 10,000 pixels": "thin.png",
                     "over max_upload_mb": "large.png"}.get(case, "fine.png")
    rng = np.random.default_rng(1)
    if case == "not an image":
        path.write_text("this is text, not a JPEG\n")
    elif case == "truncated JPEG":
        Image.fromarray(rng.integers(0, 255, (48, 72, 3), dtype=np.uint8)).save(folder / "whole.jpg")
        path.write_bytes((folder / "whole.jpg").read_bytes()[:1000])
    elif case == "decompression bomb":  # beyond PIL's own limit: refused as the header is read
        png_of_zeros(path, 20000, 20000)
    elif case == "too many pixels":  # within PIL's limit, beyond demo.max_megapixels
        png_of_zeros(path, 8000, 8000)
    elif case == "1 x 10,000 pixels":
        Image.new("RGB", (1, 10000), (200, 30, 30)).save(path)
    elif case == "over max_upload_mb":
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path)  # ~120 KB
    else:
        Image.new("RGB", (32, 32), (30, 30, 200)).save(path)
    return path


BAD = {"not an image": ({}, "cannot read image notes.jpg: cannot identify image file 'notes.jpg'"),
       "truncated JPEG": ({}, "cannot read image cut.jpg: image file is truncated"),
       "decompression bomb": ({}, "bomb.png is refused: Image size (400000000 pixels) exceeds limit"),
       "too many pixels": ({}, "huge.png is 8000 x 8000 pixels: this demo reads at most 50 megapixels"),
       "1 x 10,000 pixels": ({}, "thin.png is 1 x 10000 pixels: one side may be at most 20 times the other"),
       "over max_upload_mb": ({}, "large.png is 0.1 MB: this demo takes photos of at most 0.05 MB"),
       "no photo": ({}, "no photo: upload one"),
       "a beam over demo.max_beam_size": ({"method": "beam", "beam_size": 1000},
                                          "beam size 1000: this demo allows at most 10"),
       "n-best over the beam": ({"method": "beam", "n_best": 5},
                                "decode.n_best=5: must be between 1 and decode.beam_size=3"),
       "an unknown method": ({"method": "viterbi"}, "decode.method='viterbi': choose one of greedy, sample, beam"),
       "a value no control sends": ({"beam_size": 2.5}, "bad value for 'beam_size': Value '2.5' of type 'float'")}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_request_gets_its_message_and_the_next_one_is_served(case, captioners, photos, tmp_path):
    overrides = ["demo.max_upload_mb=0.05"] if case == "over max_upload_mb" else []
    demo = make_demo(captioners, "show_tell", "attention", overrides=overrides)
    settings, expected = BAD[case]
    bad = (bad_photo(case, tmp_path), {**GREEDY, **settings})
    good = ask(demo, (photos[0], GREEDY))

    alone = ask(demo, bad)
    assert alone[0][0].startswith(expected), alone[0][0]
    assert "Traceback" not in alone[0][0] and str(tmp_path) not in alone[0][0]  # the visitor's file name only
    assert alone[1:] == [[""], [[]], [""], [[]], [None]]
    assert good[0] == [""] and ask(demo, (photos[0], GREEDY)) == good
    together = ask(demo, (photos[0], GREEDY), bad, (photos[0], GREEDY))  # in one batch with good requests
    assert together[0] == ["", alone[0][0], ""]
    assert together[1] == [good[1][0], "", good[1][0]] and together[3] == [good[3][0], "", good[3][0]]


# --- start-up: one line, as the other commands --------------------------------------------------

@pytest.mark.parametrize("case, expected", [
    ("missing checkpoint", "checkpoint not found"),
    ("broken checkpoint", "broken.pt"),
    ("a broken one of several", "broken.pt"),
    ("no checkpoint", "no checkpoint given: add checkpoint=PATH"),
    ("a port out of range", "demo.port=70000: must be in [1, 65535]"),
    ("a beam over demo.max_beam_size", "decode.beam_size=12: must be at most demo.max_beam_size=10"),
    ("no gradio", "the demo needs gradio: pip install -e '.[demo]'"),
])
def test_start_up_problems_are_one_line(case, expected, checkpoints, tmp_path, monkeypatch, capsys):
    from captioner.demo import main

    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint\n" * 10)
    good = checkpoints["show_tell"]
    argv = {"missing checkpoint": [f"checkpoint={tmp_path / 'nope.pt'}"],
            "broken checkpoint": [f"checkpoint={tmp_path / 'broken.pt'}"],
            "a broken one of several": [f"checkpoints=[{good},{tmp_path / 'broken.pt'}]"],
            "no checkpoint": [],
            "a port out of range": [f"checkpoint={good}", "demo.port=70000"],
            "a beam over demo.max_beam_size": [f"checkpoint={good}", "decode=beam", "decode.beam_size=12"],
            "no gradio": [f"checkpoint={good}"]}[case]
    if case == "no gradio":
        monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ModuleNotFoundError
        monkeypatch.delitem(sys.modules, "captioner.serving.page", raising=False)
    monkeypatch.setattr(sys, "argv", ["captioner-demo"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


# --- the server ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(port: int, proc: subprocess.Popen | None = None, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server stopped: {proc.communicate()[1][-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no server on port {port} after {timeout} s")


@pytest.mark.slow
def test_a_port_in_use_is_one_line(checkpoints, monkeypatch, capsys):
    pytest.importorskip("gradio")
    from captioner.demo import main

    monkeypatch.setattr(sys, "argv", ["captioner-demo"])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main([f"checkpoint={checkpoints['show_tell']}", f"demo.port={port}"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.splitlines() == [f"error: port {port} on 127.0.0.1 is in use: choose another with demo.port=N"], err


@pytest.mark.slow
def test_concurrent_requests_share_one_batch_and_get_their_own_captions(captioners, photos):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    from captioner.serving.page import build_app

    class Counted(Demo):
        batches: list[int] = []

        def __call__(self, photos, *controls):
            self.batches.append(len(photos))
            if len(self.batches) == 1:
                time.sleep(2.0)  # the first request holds the model while the others queue behind it
            return super().__call__(photos, *controls)

    cfg = compose_config("demo", ["checkpoint=unused.pt", f"demo.port={free_port()}"])
    demo = Counted({"st": captioners["show_tell"]}, cfg.decode, cfg.demo)
    expected = ask(demo, *[(photo, GREEDY) for photo in photos])[2]  # each photo's caption and its score
    assert len({str(table) for table in expected}) == len(photos)
    demo.batches.clear()
    app = build_app(demo, cfg.decode, cfg.demo)
    app.queue().launch(server_name="127.0.0.1", server_port=cfg.demo.port, prevent_thread_lock=True, quiet=True)
    try:
        clients = [Client(f"http://127.0.0.1:{cfg.demo.port}/", verbose=False) for _ in range(8)]
        answers = [None] * len(clients)

        def visit(i: int) -> None:
            answers[i] = clients[i].predict(handle_file(str(photos[i % 3])), *(GREEDY[name] for name in CONTROLS),
                                           api_name="/caption")

        threads = [threading.Thread(target=visit, args=(i,)) for i in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        app.close()
    assert [a[2]["data"] for a in answers] == [expected[i % 3] for i in range(len(clients))]
    assert sum(demo.batches) == len(clients) and max(demo.batches) > 1, demo.batches


class Chromium:
    """Headless Chromium driven by the DevTools protocol over --remote-debugging-pipe (JSON
    messages ended by NUL bytes, on the browser's file descriptors 3 and 4): no other package."""

    def __init__(self, profile: Path):
        profile.mkdir()
        self._log = profile / "chromium.log"
        reads, self._to = os.pipe()
        self._from, writes = os.pipe()
        # The browser's ends become its 3 and 4 in a small Python step before chromium (a shell's
        # redirections take single-digit descriptors only); moved above 4 first, so that neither
        # is overwritten on the way.
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 5) for fd in (reads, writes)]
        for fd in (reads, writes):
            os.close(fd)
        onto_3_and_4 = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
                        "os.execv(sys.argv[3], sys.argv[3:])")
        with open(self._log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", onto_3_and_4, *map(str, ends), CHROMIUM, "--headless", "--no-sandbox",
                 "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                pass_fds=ends, stdout=subprocess.DEVNULL, stderr=log)
        for fd in ends:
            os.close(fd)
        self._buffer, self._id, self.events = b"", 0, []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def send(self, method: str, session: str | None = None, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self._to, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from, 1 << 16)
                if not chunk:
                    raise AssertionError(f"chromium closed its pipe: {self._log.read_text()[-3000:]}")
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, (method, reply["error"])
                return reply["result"]
            self.events.append(reply)

    def page(self, method: str, **params) -> dict:
        return self.send(method, self.session, **params)

    def value(self, expression: str):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait(self, expression: str, timeout: float = 120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.value(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"never true on the page: {expression}")

    def upload(self, selector: str, path: Path) -> None:
        root = self.page("DOM.getDocument", depth=-1)["root"]["nodeId"]
        node = self.page("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
        self.page("DOM.setFileInputFiles", nodeId=node, files=[str(path)])

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def text(element_id: str) -> str:
    return f"(document.querySelector('#{element_id} textarea') || {{}}).value"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium)")
def test_the_page_in_headless_chromium(checkpoints, captioners, photos, tmp_path):
    """The command as a user starts it, two checkpoints side by side; in the page: a photo
    uploaded is captioned by both (the attention one with its strip), a file that is not an image
    and an upload over demo.max_upload_mb get their messages, and the next photo is captioned.
    Nothing is fetched from anywhere but the server."""
    pytest.importorskip("gradio")
    expected = ask(make_demo(captioners, "show_tell", "attention"), (photos[0], GREEDY), (photos[1], GREEDY))
    not_an_image = bad_photo("not an image", tmp_path)
    large = bad_photo("over max_upload_mb", tmp_path)

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "captioner.demo", f"checkpoints=[{checkpoints['show_tell']},{checkpoints['attention']}]",
         f"demo.port={port}", "demo.max_upload_mb=0.05", "device=cpu"], cwd=tmp_path,
        env=env(GRADIO_TEMP_DIR=str(tmp_path / "uploads")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    browser = None
    try:
        wait_for_server(port, server)
        browser = Chromium(tmp_path / "profile")
        browser.page("Network.enable")
        browser.page("Page.navigate", url=f"http://127.0.0.1:{port}/")
        browser.wait("!!document.querySelector('#photo input[type=file]')")

        browser.upload("#photo input[type=file]", photos[0])
        assert browser.wait(text("caption-1")) == expected[3][0]
        assert browser.value(text("caption-0")) == expected[1][0] and browser.value(text("message")) == ""
        words = len(expected[3][0].split()) + 1
        assert browser.wait("(document.querySelector('#attention-1 img') || {}).naturalWidth") == (words + 1) * 116

        browser.upload("#photo input[type=file]", not_an_image)
        assert browser.wait(text("message")) == BAD["not an image"][1]
        assert browser.value(text("caption-0")) == "" and browser.value(text("caption-1")) == ""

        browser.upload("#photo input[type=file]", large)
        toast = browser.wait("[...document.querySelectorAll('.toast-body')].map(e => e.innerText).join(' ')")
        assert "exceed the maximum allowed size" in toast and "large.png" in toast

        browser.upload("#photo input[type=file]", photos[1])
        assert browser.wait(f"{text('caption-0')} === {json.dumps(expected[1][1])}")
        assert browser.value(text("message")) == "" and browser.value(text("caption-1")) == expected[3][1]
        assert server.poll() is None

        fetched = {e["params"]["request"]["url"] for e in browser.events
                   if e.get("method") == "Network.requestWillBeSent"}
        assert all(url.startswith((f"http://127.0.0.1:{port}/", "data:", "blob:")) for url in fetched), fetched
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        _, stderr = server.communicate(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.jpg", "large.png", "profile", "uploads"])


SCREENSHOT_CHECKPOINT = os.environ.get("CAPTIONER_DEMO_CHECKPOINT")
FLICKR_PHOTO = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images" / "280706862_14c30d734a.jpg"


@pytest.mark.slow
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs chromium (apt-get install chromium)")
@pytest.mark.skipif(not SCREENSHOT_CHECKPOINT, reason="CAPTIONER_DEMO_CHECKPOINT names no trained checkpoint")
@pytest.mark.skipif(not FLICKR_PHOTO.is_file(), reason="needs ../shared/data/flickr8k")
def test_a_screenshot_of_the_page_with_a_flickr8k_test_photo(tmp_path):
    """The README's screenshot: the demo of a trained attention checkpoint (CAPTIONER_DEMO_CHECKPOINT)
    in headless Chromium, a Flickr8k test photo uploaded, its caption (the caption command's, beam
    3) and attention strip on the page, saved as PNG to CAPTIONER_DEMO_SCREENSHOT (default: in
    tmp_path)."""
    pytest.importorskip("gradio")
    checkpoint = Path(SCREENSHOT_CHECKPOINT)
    captioner = Captioner.from_checkpoint(checkpoint, "cpu")
    assert captioner.attends, f"{checkpoint} does not attend: the screenshot shows an attention strip"
    beam = {**GREEDY, "method": "beam", "beam_size": 3}
    (expected,) = captioner.caption_images([FLICKR_PHOTO], beam, batch_size=1)
    out = Path(os.environ.get("CAPTIONER_DEMO_SCREENSHOT", tmp_path / "demo.png"))

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "captioner.demo", f"checkpoint={checkpoint}", f"demo.port={port}", "device=cpu",
         "decode=beam", "decode.beam_size=3"], cwd=tmp_path,
        env=env(GRADIO_TEMP_DIR=str(tmp_path / "uploads")), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    browser = None
    try:
        wait_for_server(port, server)
        browser = Chromium(tmp_path / "profile")
        browser.page("Emulation.setDeviceMetricsOverride", width=1280, height=1000, deviceScaleFactor=1, mobile=False)
        browser.page("Page.navigate", url=f"http://127.0.0.1:{port}/")
        browser.wait("!!document.querySelector('#photo input[type=file]')")
        browser.upload("#photo input[type=file]", FLICKR_PHOTO)
        assert browser.wait(text("caption-0")) == expected["caption"]
        assert browser.wait("(document.querySelector('#attention-0 img') || {}).complete")
        time.sleep(1.0)  # the photo's preview and the strip drawn
        shot = browser.page("Page.captureScreenshot", format="png", captureBeyondViewport=True)
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.communicate(timeout=60)
    png = base64.b64decode(shot["data"])
    assert png.startswith(b"\x89PNG")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(png)
    partial.replace(out)


@pytest.mark.slow
def test_the_load_test_gets_every_answer_right_through_the_rest_api(monkeypatch):
    """scripts/bench.py demo's visitors speak Gradio's REST API by hand (upload, call, event
    stream): a Gradio that changes it fails here, not only in a benchmark run."""
    pytest.importorskip("gradio")
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    from bench_demo import run

    rows = run(["--requests", "6", "--clients", "3", "--photos", "3", "--threads", "1", "--device", "cpu",
                "--max-batch-size", "4", "--encoder-batch-size", "1,4"])
    assert [(row["mode"], row["encoder_batch_size"], row["right"]) for row in rows] == \
        [("one at a time", 1, 6), ("3 concurrent clients", 1, 6), ("3 concurrent clients", 4, 6)]
