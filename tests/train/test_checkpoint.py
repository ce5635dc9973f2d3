import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from visionflow.errors import CheckpointError
from visionflow.train.checkpoint import load_checkpoint, load_weights, save_checkpoint, save_weights


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))


def _step(model, opt):
    loss = model(torch.randn(5, 4)).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_roundtrip_restores_model_optimizer_scheduler_and_rng(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        _step(model, opt)
        sched.step()
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, scheduler=sched,
                    state={"epoch": 2, "history": [{"a": 1.0}]})  # fmt: skip
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    model2 = _model()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1, betas=(0.8, 0.9))
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    state = load_checkpoint(tmp_path / "ckpt", model=model2, optimizer=opt2, scheduler=sched2)
    assert state == {"epoch": 2, "history": [{"a": 1.0}]}
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    for a, b in zip(model.state_dict().values(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert sched2.last_epoch == sched.last_epoch
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.9)
    # the next optimisation step is identical
    torch.manual_seed(1)
    _step(model, opt)
    torch.manual_seed(1)
    _step(model2, opt2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_no_pickle_in_checkpoint(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=torch.optim.AdamW(model.parameters()))
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
    json.loads((tmp_path / "ckpt" / "state.json").read_text())


def test_tampered_file_is_refused(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "ckpt", model=model)
    data = bytearray((tmp_path / "ckpt" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(tmp_path / "ckpt", model=_model())


def test_kill_between_renames_falls_back_to_previous(tmp_path):
    model = _model()
    save_checkpoint(tmp_path / "ckpt", model=model, state={"epoch": 1})
    # simulate a kill after the old checkpoint was moved aside, before the new one moved in
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")
    assert load_checkpoint(tmp_path / "ckpt", model=_model())["epoch"] == 1
    save_checkpoint(tmp_path / "ckpt", model=model, state={"epoch": 2})
    assert load_checkpoint(tmp_path / "ckpt")["epoch"] == 2
    assert not (tmp_path / "ckpt.old").exists()


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")


def test_weights_mismatch_names_keys(tmp_path):
    save_weights(tmp_path / "w.safetensors", _model())
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(tmp_path / "w.safetensors", nn.Sequential(nn.Linear(4, 2)))
