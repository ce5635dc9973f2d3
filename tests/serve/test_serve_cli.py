"""``visionflow serve`` as a user runs it: a real process, a real port."""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from serve_helpers import COLOURS, image_bytes
from typer.testing import CliRunner

from visionflow.cli import app
from visionflow.serve.security import KeyStore


def test_hash_key_line_is_accepted_by_the_key_file(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--hash-key", "admin"])
    assert result.exit_code == 0, result.output
    key = result.output.split("stored): ")[1].split()[0]
    line = result.output.split("key-file line: ")[1].strip()
    (tmp_path / "keys").write_text(line + "\n")
    assert KeyStore.from_file(tmp_path / "keys").scopes(key) == {"admin", "predict"}
    assert CliRunner().invoke(app, ["serve", "--hash-key", "root"]).exit_code == 2


def test_bad_invocations_fail_fast(tmp_path):
    runner = CliRunner()
    assert runner.invoke(app, ["serve"]).exit_code == 2  # neither a bundle nor a registry
    broken = tmp_path / "broken.vfb"
    broken.write_bytes(b"not a zip")
    result = runner.invoke(app, ["serve", str(broken)])
    assert result.exit_code == 7 and "error" in result.output
    result = runner.invoke(app, ["serve", str(broken), "--max-batch", "0"])
    assert result.exit_code == 2 and "--max-batch" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_runs_uvicorn_with_keys(serve_bundle, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("predict:sha256:" + __import__("hashlib").sha256(b"s3cret").hexdigest())
    port = _free_port()
    env = os.environ | {"VISIONFLOW_API_KEYS": str(keys)}
    cmd = [sys.executable, "-m", "visionflow.cli", "serve", str(serve_bundle), "--name", "c",
           "--port", str(port), "--max-batch", "4", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=url, timeout=10) as c:
            while True:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.1)
            image = {"images": [base64.b64encode(image_bytes(COLOURS["blue"])).decode()]}
            assert c.post("/v1/models/c:predict", json=image).status_code == 401
            r = c.post("/v1/models/c:predict", json=image, headers={"x-api-key": "s3cret"})
            assert r.status_code == 200 and r.json()["predictions"][0]["label"] == "blue"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
