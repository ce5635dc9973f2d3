import json

from visionflow.evaluate import Finding, diagnose


def rec(epoch, phase="finetune", **kw):
    base = {"epoch": epoch, "phase": phase, "frozen": phase == "probe", "lr": 1e-3, "seconds": 1.0}
    base.update(kw)
    return base


def healthy_history():
    return [
        rec(
            0,
            "probe",
            train_loss=1.0,
            train_accuracy=0.6,
            val_loss=1.0,
            val_accuracy=0.6,
            best=True,
        ),
        rec(0, train_loss=0.6, train_accuracy=0.8, val_loss=0.6, val_accuracy=0.8, best=True),
        rec(1, train_loss=0.4, train_accuracy=0.88, val_loss=0.45, val_accuracy=0.86, best=True),
        rec(2, train_loss=0.35, train_accuracy=0.9, val_loss=0.42, val_accuracy=0.87, best=True),
    ]


def titles(findings):
    return [f.title for f in findings]


def test_no_sign_case():
    findings = diagnose(
        healthy_history(),
        final={"train": {"accuracy": 0.9}, "val": {"accuracy": 0.87}, "test": {"accuracy": 0.86}},
        n_val=200,
    )
    assert [f.level for f in findings] == ["info"]
    assert "No sign of over- or underfitting" in findings[0].title


def test_overfitting_warning_and_problem():
    warn = diagnose([], final={"train": {"accuracy": 0.95}, "val": {"accuracy": 0.8}}, n_val=100)
    assert warn[0].level == "warning" and "Overfitting" in warn[0].title
    assert "95.0%" in warn[0].detail and "80.0%" in warn[0].detail
    assert "15.0 points" in warn[0].detail
    problem = diagnose([], final={"train": {"accuracy": 1.0}, "val": {"accuracy": 0.7}}, n_val=100)
    assert problem[0].level == "problem"
    assert not any("No sign" in t for t in titles(problem))


def test_gap_at_threshold_is_not_flagged():
    findings = diagnose(
        [], final={"train": {"accuracy": 0.9}, "val": {"accuracy": 0.85}}, n_val=100
    )
    assert titles(findings) == ["No sign of over- or underfitting"]


def test_accuracies_fall_back_to_best_history_record():
    history = [
        rec(0, train_loss=0.5, train_accuracy=0.99, val_loss=0.9, val_accuracy=0.7, best=True),
        rec(1, train_loss=0.4, train_accuracy=0.99, val_loss=0.95, val_accuracy=0.69, best=False),
    ]
    findings = diagnose(history, final={}, n_val=100)
    assert findings[0].level == "problem"


def test_val_loss_rising_names_best_epoch():
    history = [
        rec(0, train_loss=1.0, train_accuracy=0.7, val_loss=0.8, val_accuracy=0.7, best=True),
        rec(1, train_loss=0.7, train_accuracy=0.8, val_loss=0.5, val_accuracy=0.8, best=True),
        rec(2, train_loss=0.5, train_accuracy=0.85, val_loss=0.55, val_accuracy=0.8, best=False),
        rec(3, train_loss=0.3, train_accuracy=0.87, val_loss=0.6, val_accuracy=0.79, best=False),
        rec(4, train_loss=0.2, train_accuracy=0.88, val_loss=0.7, val_accuracy=0.79, best=False),
    ]
    findings = diagnose(
        history, final={"train": {"accuracy": 0.86}, "val": {"accuracy": 0.8}}, n_val=100
    )
    rising = [f for f in findings if "Validation loss rises" in f.title]
    assert len(rising) == 1 and rising[0].level == "warning"
    assert "epoch 1 of phase 'finetune'" in rising[0].detail
    assert "0.5000" in rising[0].detail and "0.7000" in rising[0].detail
    assert not any("No sign" in t for t in titles(findings))


def test_val_loss_rise_needs_falling_train_loss_and_enough_epochs():
    flat_train = [
        rec(i, train_loss=0.5, train_accuracy=0.8, val_loss=v, val_accuracy=0.8)
        for i, v in enumerate([0.5, 0.4, 0.6, 0.7])
    ]
    final = {"train": {"accuracy": 0.8}, "val": {"accuracy": 0.8}}
    assert not any("rises" in t for t in titles(diagnose(flat_train, final=final, n_val=100)))
    one_after = [
        rec(i, train_loss=1 - 0.1 * i, train_accuracy=0.8, val_loss=v, val_accuracy=0.8)
        for i, v in enumerate([0.5, 0.4, 0.6])
    ]
    assert not any("rises" in t for t in titles(diagnose(one_after, final=final, n_val=100)))


def test_underfitting():
    history = [
        rec(
            i,
            train_loss=2.0 - 0.1 * i,
            train_accuracy=0.3 + 0.05 * i,
            val_loss=2.0 - 0.1 * i,
            val_accuracy=0.3 + 0.05 * i,
            best=True,
        )
        for i in range(4)
    ]
    findings = diagnose(
        history, final={"train": {"accuracy": 0.45}, "val": {"accuracy": 0.42}}, n_val=100
    )
    under = [f for f in findings if "Underfitting" in f.title]
    assert len(under) == 1 and under[0].level == "warning"
    assert "budget" in under[0].detail and "larger model" in under[0].detail


def test_small_validation_set():
    final = {"train": {"accuracy": 0.9}, "val": {"accuracy": 0.85}}
    findings = diagnose([], final=final, n_val=20)
    small = [f for f in findings if f.title == "Small validation set"]
    assert len(small) == 1 and small[0].level == "info"
    assert "5.0%" in small[0].detail  # 1/20
    assert "95%" in small[0].detail
    tiny = diagnose([], final=final, n_val=5)
    assert [f.level for f in tiny if f.title == "Small validation set"] == ["warning"]
    none = diagnose([], final=final, n_val=0)
    assert any(f.title == "No validation images" for f in none)


def test_val_test_disagreement():
    final = {"train": {"accuracy": 0.9}, "val": {"accuracy": 0.88}, "test": {"accuracy": 0.7}}
    findings = diagnose([], final=final, n_val=100)
    assert findings[0].level == "warning"
    assert findings[0].title == "Validation and test accuracy disagree"
    assert "No sign of over- or underfitting" in titles(findings)


def test_ordering_and_determinism():
    history = healthy_history()
    final = {"train": {"accuracy": 1.0}, "val": {"accuracy": 0.6}, "test": {"accuracy": 0.9}}
    a = diagnose(history, final=final, n_val=12)
    b = diagnose(history, final=final, n_val=12)
    assert a == b
    levels = [f.level for f in a]
    order = {"problem": 0, "warning": 1, "info": 2}
    assert levels == sorted(levels, key=order.__getitem__)
    assert levels[0] == "problem"


def test_missing_keys_and_mixup_none():
    history = [{"epoch": 0}, {"phase": "finetune", "train_accuracy": None, "val_loss": None}, {}]
    findings = diagnose(history, final={"test": {"accuracy": 0.5}}, n_val=50)
    assert all(isinstance(f, Finding) for f in findings)
    assert diagnose([], final={}, n_val=50)[0].title.startswith("Not enough information")


def test_finding_to_json():
    f = Finding("warning", "t", "d")
    assert f.to_json() == {"level": "warning", "title": "t", "detail": "d"}
    json.dumps(f.to_json())
