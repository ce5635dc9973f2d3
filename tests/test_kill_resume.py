"""A real ``kill -9`` of ``visionflow train`` mid-fine-tune, then ``--resume`` finishes the run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def _state(run_dir):
    try:
        return json.loads((run_dir / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _checkpoint_epoch(run_dir):
    """Last epoch in the per-epoch checkpoint (-1 while there is none or it is being swapped)."""
    try:
        payload = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    except (OSError, ValueError):
        return -1
    return int(payload["state"]["epoch"])


def test_sigkill_then_resume(image_folder, tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    settings = tmp_path / "settings.yaml"
    settings.write_text("patience: null\nstrategy: finetune\n")  # no early stop: many epochs
    args = [sys.executable, "-m", "visionflow.cli", "train", str(image_folder),
            "--config", str(settings),
            "--backbone", "test_efficientnet", "--weights", "none", "--img-size", "32",
            "--epochs", "60", "--batch-size", "4", "--budget", "none",
            "--out", str(tmp_path / "runs"), "--name", "killed", "--no-search"]  # fmt: skip
    env = {**os.environ, "VISIONFLOW_OFFLINE": "1"}
    log = tmp_path / "first.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=sink)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _checkpoint_epoch(run_dir) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _state(run_dir).get("stage") != "done"
    done_before = _checkpoint_epoch(run_dir)
    assert done_before >= 1

    resumed = subprocess.run(
        [sys.executable, "-m", "visionflow.cli", "train", "--resume", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert _state(run_dir)["stage"] == "done"
    history = json.loads((run_dir / "history.json").read_text())
    epochs = [h["epoch"] for h in history]
    assert epochs == list(range(len(epochs))), "no epoch lost or repeated"
    assert len(epochs) > done_before + 1, "training went on after the kill"
