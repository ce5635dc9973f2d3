"""Helpers of the serving tests: a live uvicorn server in a thread, test images."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import uvicorn
from PIL import Image

#: Colours of the tiny model's classes (tests/conftest.py COLOURS).
COLOURS = {"blue": (30, 40, 220), "green": (40, 200, 50), "red": (220, 40, 30)}


def image_bytes(colour: tuple[int, int, int], fmt: str = "PNG", size: int = 32, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-20, 21, size=(size, size, 3))
    pixels = np.clip(np.asarray(colour)[None, None, :] + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, fmt)
    return buf.getvalue()


class LiveServer:
    """``app`` served by uvicorn in a thread; ``client`` talks to it over TCP."""

    def __init__(self, app, *, ready: bool = True) -> None:
        self.app = app
        self.wait_ready = ready
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan="on", server_header=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        if self.wait_ready:
            self.until(lambda: self.client.get("/readyz").status_code == 200)
        return self

    def until(self, check, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.05)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


@contextmanager
def live(app, *, ready: bool = True) -> Iterator[LiveServer]:
    server = LiveServer(app, ready=ready).start()
    try:
        yield server
    finally:
        server.stop()
