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


def test_sigkill_then_resume(image_folder, tmp_path):
    run_dir = tmp_path / "runs" / "killed"
    args = [sys.executable, "-m", "visionflow.cli", "train", str(image_folder),
            "--backbone", "test_efficientnet", "--weights", "none", "--img-size", "32",
            "--epochs", "40", "--batch-size", "4", "--budget", "none",
            "--out", str(tmp_path / "runs"), "--name", "killed"]  # fmt: skip
    env = {**os.environ, "VISIONFLOW_OFFLINE": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            history = run_dir / "checkpoint" / "state.json"
            if history.is_file() and json.loads(history.read_text()).get("epoch", -1) >= 1:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _state(run_dir).get("stage") != "done"
    done_before = json.loads((run_dir / "checkpoint" / "state.json").read_text())["epoch"]

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
