import pytest
from PIL import Image

from visionflow.data import available_readers, read_dataset
from visionflow.errors import ConfigError, DataError


def _img(path, colour=(0, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_folder_reader(image_folder):
    index = read_dataset(image_folder)
    assert index.format == "folder"
    assert index.classes == ["blue", "green", "red"]
    assert index.counts() == {"blue": 12, "green": 12, "red": 12}
    assert index.root == image_folder.resolve()
    assert all(s.path.is_absolute() and s.split is None for s in index.samples)
    paths = [s.path for s in index.samples]
    assert paths == sorted(paths)
    assert {s.path.suffix for s in index.samples} == {".png", ".jpg"}


def test_folder_reader_nested_and_hidden(tmp_path):
    root = tmp_path / "ds"
    _img(root / "a" / "x.png")
    _img(root / "a" / "deep" / "er" / "y.png")
    _img(root / "b" / "z.png")
    _img(root / "b" / ".hidden.png")
    _img(root / ".git" / "q.png")
    index = read_dataset(root, format="folder")
    assert index.classes == ["a", "b"]
    assert [(s.source, s.label) for s in index.samples] == [
        ("a/deep/er/y.png", "a"),
        ("a/x.png", "a"),
        ("b/z.png", "b"),
    ]


def test_folder_reader_split_layout(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "valid", "test"):
        for cls in ("cat", "dog"):
            _img(root / split / cls / f"{split}.png")
    index = read_dataset(root)
    assert index.classes == ["cat", "dog"]
    assert len(index) == 6
    assert {(s.label, s.split) for s in index.samples} == {
        (c, s) for c in ("cat", "dog") for s in ("train", "val", "test")
    }


def test_csv_reader_relative_paths_and_splits(tmp_path):
    root = tmp_path / "ds"
    _img(root / "imgs" / "a.png")
    _img(root / "imgs" / "b.png")
    (root / "labels.csv").write_text("path,label,split\nimgs/a.png,cat,train\nimgs/b.png,dog,val\n")
    index = read_dataset(root)
    assert index.format == "csv" and index.root == root.resolve()
    assert [(s.path, s.label, s.split) for s in index.samples] == [
        (root.resolve() / "imgs" / "a.png", "cat", "train"),
        (root.resolve() / "imgs" / "b.png", "dog", "val"),
    ]
    assert index.samples[1].source == "labels.csv:3"


def test_tsv_file_and_missing_file_is_kept(tmp_path):
    root = tmp_path / "ds"
    _img(root / "a.png")
    (root / "list.tsv").write_text("file\tclass\na.png\tcat\nmissing.png\tdog\n")
    index = read_dataset(root / "list.tsv")
    assert index.format == "csv"
    assert [s.label for s in index.samples] == ["cat", "dog"]
    assert not index.samples[1].path.exists()  # reported later by the checks, not here


@pytest.mark.parametrize("bad", ["../outside.png", "/etc/passwd", "sub/../../x.png"])
def test_csv_path_escaping_root(tmp_path, bad):
    root = tmp_path / "ds"
    _img(root / "a.png")
    (root / "labels.csv").write_text(f"path,label\na.png,cat\n{bad},dog\n")
    with pytest.raises(DataError, match=r"line 3: .* escapes the dataset root"):
        read_dataset(root)


def test_csv_errors_name_file_and_line(tmp_path):
    (tmp_path / "labels.csv").write_text("path,label,split\na.png,cat,training\n")
    with pytest.raises(DataError, match=r"labels\.csv line 2: invalid split 'training'"):
        read_dataset(tmp_path)
    (tmp_path / "labels.csv").write_text("image,kind\na.png,cat\n")
    with pytest.raises(DataError, match="no label column"):
        read_dataset(tmp_path)


def test_auto_detection_prefers_label_file(tmp_path):
    root = tmp_path / "ds"
    _img(root / "cat" / "a.png")
    _img(root / "dog" / "b.png")
    assert read_dataset(root).format == "folder"
    (root / "labels.csv").write_text("path,label\ncat/a.png,feline\n")
    index = read_dataset(root)
    assert index.format == "csv" and index.classes == ["feline"]
    assert read_dataset(root, format="folder").classes == ["cat", "dog"]
    assert available_readers()[:2] == ["csv", "folder"]


def test_unknown_format_and_missing_path(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'folder'"):
        read_dataset(tmp_path, format="foldr")
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError, match="not a dataset layout"):
        read_dataset(tmp_path)
