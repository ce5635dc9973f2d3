import base64

import numpy as np
import pytest

from visionflow.evaluate import (
    Finding,
    ReportContext,
    ReportSection,
    classification_metrics,
    html_image,
    html_table,
    plot_confusion_matrix,
    render_report,
    write_report,
)

EVIL = "<script>alert(1)</script>"


def make_context(tmp_path, **overrides):
    names = ["cat", EVIL, "dog & co"]
    y = np.array([0, 1, 2, 1, 0])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05]]
    )
    test = classification_metrics(y, probs, names, topk=(2,))
    image = plot_confusion_matrix(test["confusion_matrix"], names, tmp_path / "cm.png")
    values = {
        "title": "Report <b>title</b>",
        "run_name": "run-1",
        "created_at": "2024-01-01T00:00:00Z",
        "summary": {"model": "resnet", "best val": 0.9, "missing": None, "nan": float("nan")},
        "metrics": {"val": test, "test": test},
        "history": [
            {
                "epoch": 0,
                "phase": "probe",
                "lr": 0.01,
                "train_loss": 1.0,
                "train_accuracy": 0.5,
                "val_loss": 1.1,
                "val_accuracy": 0.4,
                "seconds": 2.5,
                "best": True,
            },
            {"epoch": 0, "phase": "finetune"},
        ],
        "findings": [
            Finding("problem", "Overfitting", "gap <big>"),
            Finding("info", "Small validation set", "five images"),
        ],
        "data_report": {
            "root": "/data/<root>",
            "format": "folder",
            "num_files": 250,
            "num_usable": 240,
            "classes": names,
            "counts": {"cat": 100, EVIL: 90, "dog & co": 50},
            "imbalance_ratio": 2.0,
            "unreadable": [{"path": f"bad_{i}.jpg", "reason": "truncated"} for i in range(150)],
            "duplicates": [["a.jpg", "b.jpg"]],
            "conflicts": [
                {"sha256": "ab" * 32, "paths": ["x.jpg", "y.jpg"], "labels": ["cat", EVIL]}
            ],
            "tiny": [{"path": "t.jpg", "reason": "8x8"}],
            "small_classes": {"dog & co": 50},
            "size_stats": {"min_width": 8, "max_width": 4000},
            "modes": {"RGB": 240},
            "warnings": [f"class {EVIL} is odd"],
        },
        "config": {"data": {"root": "/data/<root>"}, "train": {"epochs": 3}},
        "weights": {"source": "hub", "sha256": "deadbeef", "url": "https://x/?a=<b>"},
        "phases": [{"name": "data checks", "seconds": 1.5}, {"name": "finetune", "seconds": 30.0}],
        "images": {"Confusion matrix <test>": image},
    }
    values.update(overrides)
    return ReportContext(**values)


def test_escapes_user_strings(tmp_path):
    html = render_report(make_context(tmp_path))
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "Report &lt;b&gt;title&lt;/b&gt;" in html
    assert "dog &amp; co" in html
    assert "/data/&lt;root&gt;" in html
    assert "gap &lt;big&gt;" in html


def test_sections_and_values(tmp_path):
    html = render_report(make_context(tmp_path))
    assert html.startswith("<!DOCTYPE html>")
    for title in (
        "Summary",
        "Findings",
        "Metrics",
        "Per-class metrics (test)",
        "Plots",
        "Training history",
        "Phases and time",
        "Data",
        "Weights",
        "Configuration",
    ):
        assert f"<h2>{title}</h2>" in html
    assert 'class="finding problem"' in html and 'class="finding info"' in html
    assert html.index("finding problem") < html.index("finding info")
    assert "n/a" in html  # None / NaN values
    assert "top2" in html and "ECE" in html and "log loss" in html
    assert "<details>" in html
    assert "Unreadable files (150)" in html
    assert "bad_99.jpg" in html and "bad_100.jpg" not in html
    assert "and 50 more" in html
    assert "<pre>" in html and "&quot;epochs&quot;: 3" in html
    assert "http" not in html.replace("https://x/?a=&lt;b&gt;", "")  # no external assets


def test_images_are_data_uris(tmp_path):
    ctx = make_context(tmp_path)
    html = render_report(ctx)
    assert 'src="data:image/png;base64,' in html
    encoded = html.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(encoded) == ctx.images["Confusion matrix <test>"].read_bytes()
    assert "<figcaption>Confusion matrix &lt;test&gt;</figcaption>" in html


def test_missing_image_is_reported_not_raised(tmp_path):
    html = render_report(make_context(tmp_path, images={"gone": tmp_path / "nope.png"}))
    assert "could not be read" in html


def test_data_report_none_and_missing_keys(tmp_path):
    html = render_report(make_context(tmp_path, data_report=None))
    assert "<h2>Data</h2>\n<p>n/a</p>" in html
    html = render_report(make_context(tmp_path, data_report={"num_files": 3, "counts": None}))
    assert "<h2>Data</h2>" in html
    html = render_report(make_context(tmp_path, data_report={}))
    assert "<h2>Data</h2>" in html


def test_minimal_context(tmp_path):
    ctx = ReportContext(
        title="t",
        run_name="r",
        created_at="now",
        summary={},
        metrics={},
        history=[],
        findings=[],
        data_report=None,
        config={},
        weights={},
        phases=[],
        images={},
    )
    html = render_report(ctx)
    assert "<h2>Per-class metrics</h2>" in html
    assert html.count("n/a") >= 5


def test_per_class_uses_val_when_no_test(tmp_path):
    ctx = make_context(tmp_path)
    ctx.metrics = {"val": ctx.metrics["val"]}
    assert "Per-class metrics (val)" in render_report(ctx)


def test_extra_sections_are_trusted(tmp_path):
    extra = ReportSection(title="Grad-CAM <x>", html="<p id='mine'>ok</p>")
    html = render_report(make_context(tmp_path, extra_sections=[extra]))
    assert "<h2>Grad-CAM &lt;x&gt;</h2>" in html
    assert "<p id='mine'>ok</p>" in html
    assert html.index("Grad-CAM") > html.index("<h2>Configuration</h2>")


def test_write_report_atomic(tmp_path):
    out = write_report(make_context(tmp_path), tmp_path / "out" / "report.html")
    assert out == tmp_path / "out" / "report.html"
    text = out.read_text(encoding="utf-8")
    assert text.endswith("</html>\n")
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]


@pytest.mark.parametrize(
    ("rows", "headers", "expected"),
    [
        ([{"a": 1, "b": "<x>"}, {"b": None, "c": 0.5}], None, "<th>a</th><th>b</th><th>c</th>"),
        ([["<x>", 2]], ["k&", "v"], "<th>k&amp;</th>"),
    ],
)
def test_html_table(rows, headers, expected):
    out = html_table(rows, headers)
    assert expected in out
    assert "<x>" not in out and "&lt;x&gt;" in out


def test_html_table_na():
    out = html_table([{"a": None}])
    assert "<td>n/a</td>" in out


def test_html_image(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nabc")
    out = html_image(path, 'alt "q" <x>')
    assert out.startswith('<img src="data:image/png;base64,')
    assert 'alt="alt &quot;q&quot; &lt;x&gt;"' in out
