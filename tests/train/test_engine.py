import itertools

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from visionflow.models.heads import TaskModel
from visionflow.models.tasks import ClassificationTask
from visionflow.train.budget import Deadline
from visionflow.train.callbacks import Callback, StopTraining
from visionflow.train.engine import Engine, FitConfig


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.3
    x[:, 0] += (y == 0).float()[:, None, None] * 1.5  # class-dependent colour
    x[:, 1] += (y == 1).float()[:, None, None] * 1.5
    return TensorDataset(x, y)


def _loader(ds, shuffle=True):
    return DataLoader(ds, batch_size=8, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def _model(seed=0):
    torch.manual_seed(seed)
    backbone = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    task = ClassificationTask(["a", "b", "c"], label_smoothing=0.1)
    return TaskModel(backbone, task.build_head(backbone.num_features)), task


def _cfg(**kw):
    base = dict(epochs=4, lr=3e-3, backbone_lr=3e-3, warmup_epochs=0.5, patience=None, seed=0)
    base.update(kw)
    return FitConfig(**base)


def test_fit_learns_and_restores_best():
    model, task = _model()
    engine = Engine(model, task, _cfg(epochs=6))
    result = engine.fit(_loader(_data()), _loader(_data(seed=1), shuffle=False))
    assert result.stopped == "epochs"
    assert len(result.history) == 6
    assert result.best_metric is not None and result.best_metric >= 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    outputs, targets = engine.predict(_loader(_data(seed=1), shuffle=False))
    acc = (outputs.argmax(1) == targets).float().mean().item()
    assert acc == pytest.approx(result.best_metric)


class _Kill(Callback):
    def __init__(self, after):
        self.after = after

    def on_epoch_end(self, engine, record):
        if record["epoch"] == self.after:
            raise RuntimeError("killed")


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    model, task = _model()
    full = Engine(model, task, _cfg(), checkpoint_dir=tmp_path / "a" / "checkpoint")
    full.fit(_loader(_data()), _loader(_data(seed=1), shuffle=False))

    model_b, _ = _model()
    killed = Engine(model_b, task, _cfg(), checkpoint_dir=tmp_path / "b" / "checkpoint",
                    callbacks=[_Kill(after=1)])  # fmt: skip
    with pytest.raises(RuntimeError, match="killed"):
        killed.fit(_loader(_data()), _loader(_data(seed=1), shuffle=False))
    model_c, _ = _model(seed=123)  # different init: everything must come from the checkpoint
    resumed = Engine(model_c, task, _cfg(), checkpoint_dir=tmp_path / "b" / "checkpoint")
    result = resumed.fit(_loader(_data()), _loader(_data(seed=1), shuffle=False), resume=True)
    assert [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    for a, b in zip(full.history, result.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"])
    for a, b in zip(model.state_dict().values(), model_c.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)


def test_deadline_stops_training():
    model, task = _model()
    result = Engine(model, task, _cfg(epochs=50), deadline=Deadline(0.0001)).fit(_loader(_data()))
    assert result.stopped == "budget"
    assert result.history == []


def test_early_stopping():
    model, task = _model()
    result = Engine(model, task, _cfg(epochs=30, lr=0.0, freeze_epochs=30, patience=2)).fit(
        _loader(_data()), _loader(_data(seed=1), shuffle=False)
    )
    assert result.stopped == "early_stopping"
    assert len(result.history) == 3


def test_frozen_backbone_is_not_updated():
    model, task = _model()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    result = Engine(model, task, _cfg(epochs=1, freeze_epochs=1)).fit(_loader(_data()))
    assert result.history[0]["frozen"] is True
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(before[k], v), k


def _rates(engine, steps):
    optimizer = torch.optim.AdamW(engine._param_groups(), lr=1.0)
    scheduler = engine._scheduler(optimizer, steps_per_epoch=10)
    out = []
    for _ in range(steps):
        out.append({g["tag"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    return out


def test_a_frozen_backbone_warms_up_when_it_starts_training():
    model, task = _model()
    cfg = dict(epochs=6, lr=1e-3, backbone_lr=1e-4, warmup_epochs=1, min_lr_ratio=0.01)
    frozen = _rates(Engine(model, task, _cfg(**cfg, freeze_epochs=2)), 60)
    plain = _rates(Engine(model, task, _cfg(**cfg)), 60)
    assert [r["head"] for r in frozen] == [r["head"] for r in plain]  # the head: unchanged
    backbone = [r["backbone.0"] for r in frozen]
    assert backbone[:20] == [0.0] * 20  # frozen: epochs 0 and 1
    # from the first unfrozen step: a ramp over one epoch, under the shared cosine decay,
    # instead of the full rate (what a warm-up counted from step 0 left it)
    assert backbone[20] == pytest.approx(plain[20]["backbone.0"] / 11)
    assert all(b > a for a, b in itertools.pairwise(backbone[20:31]))
    assert backbone[30:] == pytest.approx([r["backbone.0"] for r in plain[30:]])
    # no frozen epochs: the backbone follows the one schedule, as before
    assert [r["backbone.0"] for r in plain][:10] == pytest.approx(
        [1e-4 * (s + 1) / 11 for s in range(10)]
    )


def test_mixup_cutmix_and_callback_stop():
    class Stop(Callback):
        def on_epoch_end(self, engine, record):
            raise StopTraining("pruned")

    model, task = _model()
    result = Engine(model, task, _cfg(mixup=0.2, cutmix=1.0), callbacks=[Stop()]).fit(
        _loader(_data())
    )
    assert result.stopped == "callback: pruned"
    assert result.history[0]["train_accuracy"] is None  # soft labels: no hard accuracy


@pytest.mark.parametrize("channels_last", [True, False])
def test_model_can_be_trained_after_predicting(channels_last):
    """Feature extraction first, fine-tuning after (the recipe's order) must keep grads."""
    model, task = _model()
    engine = Engine(model, task, _cfg(epochs=1, channels_last=channels_last))
    engine.predict(_loader(_data(), shuffle=False))
    assert all(not p.is_inference() for p in model.parameters())
    result = engine.fit(_loader(_data()))
    assert len(result.history) == 1
