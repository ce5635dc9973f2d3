import pytest
import torch

from visionflow.errors import DataError
from visionflow.train.probe import DEFAULT_CS, fit_linear_probe


def _blobs(n, seed, classes=3, dim=16):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 3
    return centres[y] + torch.randn(n, dim, generator=g) + 10.0, y  # offset: tests the folding


def test_probe_separates_blobs_and_folds_scaling():
    xtr, ytr = _blobs(60, 0)
    xva, yva = _blobs(30, 1)
    result = fit_linear_probe(xtr, ytr, xva, yva, num_classes=3)
    assert result.val_accuracy == 1.0
    assert result.selected_by == "cv" and result.cv_accuracy == 1.0
    assert [s["C"] for s in result.scores] == list(DEFAULT_CS)
    # the folded layer on raw features reproduces the recorded accuracy
    acc = (result.logits(xva, final=False).argmax(1) == yva).float().mean().item()
    assert acc == pytest.approx(result.val_accuracy)
    assert result.weight.shape == (3, 16) and result.bias.shape == (3,)
    # the refit on train + val is a different layer that still separates everything
    assert result.refit and result.final_weight is not None
    assert not torch.equal(result.final_weight, result.weight)
    assert (result.logits(xva).argmax(1) == yva).all()


def test_probe_refit_uses_validation_images():
    """Classes seen only through validation images are learned by the refit."""
    xtr, ytr = _blobs(60, 0)
    xva, yva = _blobs(30, 1)
    keep = ytr != 2  # class 2 has no training image at all
    result = fit_linear_probe(xtr[keep], ytr[keep], xva, yva, num_classes=3)
    assert (result.logits(xva, final=False).argmax(1) != 2).all()
    assert (result.logits(xva).argmax(1) == yva).float().mean() > 0.95


def test_c_is_chosen_on_validation_when_cv_is_impossible():
    xtr, ytr = _blobs(3, 0)  # one image per class: no folds
    xva, yva = _blobs(30, 1)
    result = fit_linear_probe(xtr, ytr, xva, yva, num_classes=3, refit=False)
    assert result.selected_by == "val" and not result.refit
    assert len(result.scores) == len(DEFAULT_CS) and result.cv_accuracy is None


def test_probe_handles_binary_and_absent_classes():
    xtr, ytr = _blobs(40, 0, classes=2)
    result = fit_linear_probe(xtr, ytr, None, None, num_classes=3)
    logits = result.logits(xtr)
    assert (logits.argmax(1) == ytr).float().mean() > 0.95
    assert (logits.argmax(1) != 2).all()  # class 2 never seen in training never wins


def test_probe_needs_two_classes():
    with pytest.raises(DataError, match="single class"):
        fit_linear_probe(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), None, None,
                         num_classes=2)  # fmt: skip


def test_choice_of_c_stops_when_time_is_up():
    """A contended CPU must not stretch the probe: after the first fold (or the first C on
    validation) the selection ends with what it measured; the final fits still run."""
    xtr, ytr = _blobs(60, 0)
    xva, yva = _blobs(30, 1)
    asked = []

    def time_up():
        asked.append(1)
        return True

    result = fit_linear_probe(xtr, ytr, xva, yva, num_classes=3, time_up=time_up)
    assert result.selected_by == "cv (1 of 5 folds: time)" and asked
    assert result.val_accuracy == 1.0 and result.refit
    assert len(result.scores) == len(DEFAULT_CS)  # every C of the one fold that ran

    xtr, ytr = _blobs(3, 0)  # no folds: C chosen on validation, stopped after the first C
    result = fit_linear_probe(xtr, ytr, xva, yva, num_classes=3, time_up=lambda: True)
    assert result.selected_by == "val" and len(result.scores) == 1
    # tried middle out: the first C is the one nearest the middle of the range, not its end
    assert result.scores[0]["C"] in (0.1, 0.3) and result.scores[0]["C"] == result.C


def test_time_that_never_runs_out_changes_nothing():
    xtr, ytr = _blobs(60, 0)
    xva, yva = _blobs(30, 1)
    plain = fit_linear_probe(xtr, ytr, xva, yva, num_classes=3)
    timed = fit_linear_probe(xtr, ytr, xva, yva, num_classes=3, time_up=lambda: False)
    assert timed.selected_by == "cv" and timed.C == plain.C
    assert torch.equal(timed.weight, plain.weight)


def test_a_single_c_is_used_as_given_without_selection():
    xtr, ytr = _blobs(60, 0)
    xva, yva = _blobs(30, 1)
    result = fit_linear_probe(xtr, ytr, xva, yva, num_classes=3, Cs=(0.3,))
    assert result.C == 0.3 and result.selected_by == "given" and result.scores == []
    assert result.val_accuracy == 1.0 and result.refit
