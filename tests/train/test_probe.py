import pytest
import torch

from visionflow.errors import DataError
from visionflow.train.probe import fit_linear_probe


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
    assert len(result.scores) == 5
    # the folded layer on raw features reproduces the recorded accuracy
    acc = (result.logits(xva).argmax(1) == yva).float().mean().item()
    assert acc == pytest.approx(result.val_accuracy)
    assert result.weight.shape == (3, 16) and result.bias.shape == (3,)


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
