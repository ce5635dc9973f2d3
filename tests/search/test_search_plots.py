import json
import math
import random

import pytest

from visionflow.evaluate.report import ReportSection
from visionflow.search.plots import (
    param_importances,
    plot_optimization_history,
    plot_param_importance,
    plot_trial_curves,
    search_report_section,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
HOSTILE = "<script>alert(1)</script>"


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 1000
    assert [p for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def row(number, state, value=None, curve=None, **params):
    info = {}
    if curve is not None:
        info["curve"] = curve
        info["strategy"] = params.get("strategy", "finetune")
        info["epochs"] = len(curve)
    if state == "failed":
        info["error"] = "RuntimeError: CUDA out of memory"
    return {
        "number": number,
        "state": state,
        "value": value,
        "params": params,
        "duration_s": 12.5 + number,
        "info": info,
    }


def mixed_rows():
    """A search as the runner leaves it: probes, fine-tunes, pruned and failed trials."""
    return [
        row(0, "complete", 0.71, strategy="probe", backbone="resnet18", img_size=160),
        row(
            1,
            "complete",
            0.88,
            curve=[[1, 0.6], [2, 0.8], [3, 0.88]],
            strategy="finetune",
            backbone="resnet18",
            img_size=224,
            lr=3e-4,
        ),
        row(
            2,
            "pruned",
            0.55,
            curve=[[1, 0.5], [2, 0.55]],
            strategy="finetune",
            backbone="mobilenetv3_large_100",
            img_size=160,
            lr=1e-2,
        ),
        row(3, "failed", strategy="finetune", backbone="convnext_tiny", img_size=224, lr=1e-5),
        row(
            4,
            "complete",
            0.91,
            curve=[[1, 0.7], [2, 0.85], [3, 0.9], [4, 0.91]],
            strategy="finetune",
            backbone="tf_efficientnet_lite0",
            img_size=224,
            lr=1e-3,
        ),
        row(5, "complete", 0.69, strategy="probe", backbone="mobilenetv3_large_100", img_size=224),
        row(
            6,
            "pruned",
            None,
            curve=[[1, 0.4]],
            strategy="finetune",
            backbone="resnet18",
            img_size=160,
            lr=5e-5,
        ),
        row(7, "running", strategy="probe", backbone="resnet18", img_size=160),
    ]


def test_plots_write_pngs(tmp_path):
    rows = mixed_rows()
    assert_png(plot_optimization_history(rows, tmp_path / "history.png"))
    assert_png(plot_trial_curves(rows, tmp_path / "curves.png", top=3))
    importances = param_importances(rows)
    assert importances
    assert_png(plot_param_importance(importances, tmp_path / "importance.png"))


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [row(0, "complete", 0.8, strategy="probe")],
        [row(0, "failed"), row(1, "failed")],
        [row(0, "pruned", None, curve=[[1, 0.3], [2, 0.35]]), row(1, "failed")],
        [row(0, "pruned"), row(1, "running")],
    ],
    ids=["no-rows", "one-row", "all-failed", "only-pruned", "no-values"],
)
def test_plots_edge_cases(tmp_path, rows):
    assert_png(plot_optimization_history(rows, tmp_path / "history.png"))
    assert_png(plot_trial_curves(rows, tmp_path / "curves.png"))
    importances = param_importances(rows)
    assert importances == {}
    assert_png(plot_param_importance(importances, tmp_path / "importance.png"))


def test_plots_tolerate_broken_rows(tmp_path):
    rows = [
        {"number": "3", "state": "COMPLETE", "value": "0.5", "params": None, "info": "{bad json"},
        {"number": None, "state": "complete", "value": 0.9},
        {"state": "complete", "value": math.nan, "number": 1, "info": {"curve": "nope"}},
        row(2, "complete", math.inf, curve=[[1, math.nan], ["x", 0.2], [2], [3, 0.4]]),
        "not a row",
    ]
    assert_png(plot_optimization_history(rows, tmp_path / "history.png"))
    assert_png(plot_trial_curves(rows, tmp_path / "curves.png", top=0))
    assert_png(plot_trial_curves(rows, tmp_path / "curves2.png"))
    assert_png(plot_param_importance({"lr": math.nan, HOSTILE: 0.5}, tmp_path / "imp.png"))


def test_importance_ranks_determining_param_above_noise():
    rng = random.Random(0)
    rows = []
    for i in range(24):
        backbone = ["resnet18", "convnext_tiny", "mobilenetv3_large_100"][i % 3]
        value = {"resnet18": 0.7, "convnext_tiny": 0.9, "mobilenetv3_large_100": 0.8}[backbone]
        rows.append(
            row(
                i,
                "complete",
                value,
                backbone=backbone,
                noise=rng.uniform(0, 1),
                pinned="x",
            )
        )
    rows.append(row(99, "failed", backbone="resnet18", noise=0.5, pinned="x"))
    importances = param_importances(rows)
    assert set(importances) == {"backbone", "noise"}  # "pinned" never varies
    assert importances["backbone"] > importances["noise"]
    assert list(importances) == ["backbone", "noise"]
    assert sum(importances.values()) == pytest.approx(1.0)
    assert all(math.isfinite(v) and v >= 0 for v in importances.values())
    # deterministic, and independent of the order of the rows
    assert param_importances(list(reversed(rows))) == importances


def test_importance_numeric_log_scale_and_csv_strings():
    """A log-spread lr decides the value; rows read back from a CSV hold strings."""
    rows = []
    for i in range(16):
        lr = 10 ** (-5 + 4 * i / 15)
        rows.append(
            {
                "number": str(i),
                "state": "complete",
                "value": str(1.0 - abs(math.log10(lr) + 3) / 4),
                "params": {"lr": str(lr), "batch_size": ["16", "32"][i % 2], "flag": ""},
                "info": "",
            }
        )
    importances = param_importances(rows)
    assert list(importances) == ["lr", "batch_size"]
    assert importances["lr"] > 0.8


def test_importance_conditional_params_and_constant_value():
    rows = [row(i, "complete", 0.5, strategy="probe") for i in range(3)]
    rows += [row(3 + i, "complete", 0.5, strategy="finetune", lr=10.0**-i) for i in range(3)]
    assert param_importances(rows) == {"lr": 0.0, "strategy": 0.0}
    for i, r in enumerate(rows):
        r["value"] = 0.9 if r["params"]["strategy"] == "finetune" else 0.6 + 0.01 * i
    importances = param_importances(rows)
    assert set(importances) == {"lr", "strategy"}
    assert sum(importances.values()) == pytest.approx(1.0)
    # only three complete trials: too few
    assert param_importances([*rows[:3], row(9, "pruned", 0.1, lr=1.0)]) == {}


def test_report_section(tmp_path):
    rows = mixed_rows()
    images = {
        "Optimization history": plot_optimization_history(rows, tmp_path / "h.png"),
        "Trial curves": plot_trial_curves(rows, tmp_path / "c.png"),
    }
    best = rows[4]
    section = search_report_section(
        rows,
        images,
        best=best,
        counts={"complete": 4, "pruned": 2, "failed": 1, "running": 1, "waiting": 0},
        budget_note="Budget: 10 minutes, 9m12s used.",
    )
    assert isinstance(section, ReportSection)
    body = section.html
    assert "8 trials: 4 complete, 2 pruned, 1 failed, 1 running. Budget: 10 minutes" in body
    assert body.count("data:image/png;base64,") == 2
    assert "91.00%" in body and "tf_efficientnet_lite0" in body
    assert "CUDA out of memory" in body
    # leaderboard order: best complete trial first
    assert body.index("<td>1</td><td>4</td><td>complete</td><td>91.00%</td>") > 0
    assert "No trial completed" not in body


def test_report_section_escapes_hostile_values(tmp_path):
    rows = mixed_rows()
    rows[1]["params"]["backbone"] = HOSTILE
    rows[1]["params"][HOSTILE] = HOSTILE
    rows[3]["info"]["error"] = HOSTILE
    rows[4]["info"]["strategy"] = HOSTILE
    image = plot_trial_curves(rows, tmp_path / "c.png")
    section = search_report_section(
        rows,
        {HOSTILE: image, "missing": tmp_path / "nope.png"},
        best=rows[1],
        counts={HOSTILE: 1, "complete": 3},
        budget_note=HOSTILE,
    )
    assert "<script>" not in section.html
    assert "&lt;script&gt;" in section.html
    assert "could not be read" in section.html


def test_report_section_without_trials():
    section = search_report_section(
        [], {}, best=None, counts={"complete": 0}, budget_note="Budget: 1 trial."
    )
    assert "0 trials. Budget: 1 trial." in section.html
    assert "No trial completed" in section.html
    assert "NaN" not in section.html and "nan" not in section.html


def test_leaderboard_top_20_and_info_as_json():
    rows = [row(i, "complete", i / 100, strategy="probe") for i in range(30)]
    for r in rows:
        r["info"] = json.dumps({"strategy": "probe"})
    section = search_report_section(rows, {}, best=rows[-1], counts={}, budget_note="")
    assert section.html.count("<td>probe</td>") == 20 + 1  # 20 leaderboard rows, best config
    assert "30 trials: 30 complete." in section.html
    assert "and 10 more trials" in section.html
    assert "<td>1</td><td>29</td><td>complete</td><td>29.00%</td>" in section.html
