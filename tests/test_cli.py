import json

from typer.testing import CliRunner

from visionflow.cli import app

runner = CliRunner()
TINY = ["--backbone", "test_efficientnet", "--weights", "none", "--img-size", "32",
        "--epochs", "2", "--batch-size", "8", "--budget", "2m", "--no-search"]  # fmt: skip


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "predict", "evaluate", "inspect", "demo", "worker", "k8s"):
        assert command in result.output
    train_help = runner.invoke(app, ["train", "--help"]).output
    for flag in ("--budget", "--backbone", "--img-size", "--out", "--resume", "--weights"):
        assert flag in train_help


def test_train_predict_evaluate(image_folder, tmp_path):
    result = runner.invoke(
        app, ["train", str(image_folder), *TINY, "--out", str(tmp_path), "--name", "r", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["run_dir"] == str(tmp_path / "r")
    assert 0.0 <= payload["metrics"]["test"]["accuracy"] <= 1.0

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    images = sorted(image_folder.rglob("*.png"))[:2]
    result = runner.invoke(
        app, ["predict", str(tmp_path / "r"), *map(str, images), str(bad), "-f", "json"]
    )
    assert result.exit_code == 3  # some inputs unreadable: the rest are still predicted
    out = json.loads(result.stdout)
    assert len(out["predictions"]) == 2
    assert out["errors"][0]["source"] == str(bad)

    result = runner.invoke(app, ["predict", str(tmp_path / "r"), str(image_folder), "-f", "csv"])
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == "source,label,probability,topk"

    result = runner.invoke(app, ["evaluate", str(tmp_path / "r"), str(image_folder), "--json"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in json.loads(result.stdout)


def test_errors_have_exit_codes_and_no_traceback(tmp_path):
    result = runner.invoke(
        app, ["train", str(tmp_path / "missing"), *TINY, "--out", str(tmp_path / "runs")]
    )
    assert result.exit_code == 3
    assert "does not exist" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()  # nothing written for a dataset that is not there
    result = runner.invoke(app, ["train", str(tmp_path), "--budget", "soon"])
    assert result.exit_code == 2 and "not a duration" in result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "norun"), "x.png"])
    assert result.exit_code == 5


def test_inspect_salted(salted_folder, tmp_path):
    target = tmp_path / "report.json"
    result = runner.invoke(app, ["inspect", str(salted_folder), "--out", str(target), "--json"])
    report = json.loads(target.read_text())
    assert report["unreadable"], "the salted folder has unreadable files"
    assert result.exit_code in (0, 3)


def test_error_messages_are_printed_verbatim(image_folder, tmp_path):
    """Brackets in a message (lists, paths) are text, not Rich markup, and never wrapped."""
    weights = tmp_path / "[bold]weird[/bold] name" / ("long" * 30) / "w.safetensors"
    args = [
        "train",
        str(image_folder),
        *TINY[:2],
        "--weights",
        str(weights),
        "--out",
        str(tmp_path),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 4, result.output
    assert str(weights) in result.output
