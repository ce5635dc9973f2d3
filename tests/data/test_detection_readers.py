"""COCO, Pascal VOC and YOLO readers: the same labels in each give the same records."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from detection_synth import (
    DET_IMAGES,
    YOLO_TOL,
    assert_same_records,
    draw,
    voc_xml,
    write_all,
    write_voc,
)
from PIL import Image

from visionflow.data.detection import (
    DetectionIndex,
    DetectionSample,
    available_detection_readers,
    detect_detection_format,
    detection_split,
    read_detection,
)
from visionflow.errors import ConfigError, DataError


@pytest.fixture
def det_datasets(tmp_path: Path) -> dict[str, Path]:
    return write_all(tmp_path)


# ----------------------------------------------------------------------------- acceptance
def test_three_formats_give_identical_records(det_datasets):
    coco = read_detection(det_datasets["coco"])
    voc = read_detection(det_datasets["voc"])
    yolo = read_detection(det_datasets["yolo"])
    assert (coco.format, voc.format, yolo.format) == ("coco", "voc", "yolo")
    assert coco.classes == ["apple", "leaf", "sky"]
    assert coco.issues == voc.issues == yolo.issues == []
    assert_same_records(coco, voc)  # exact: integers in both
    assert_same_records(coco, yolo, tol=YOLO_TOL)

    # and they are the boxes that were drawn, in the internal convention
    truth = {name: (size, split, boxes) for name, size, split, boxes in DET_IMAGES}
    for s in coco.samples:
        size, split, boxes = truth[s.path.name]
        assert (s.width, s.height, s.split) == (*size, split)
        assert s.labels == tuple(label for label, _ in boxes)
        assert s.boxes == tuple(tuple(float(v) for v in box) for _, box in boxes)
        assert s.path.is_file() and s.path.is_absolute()


def test_auto_detection_picks_the_reader(det_datasets, image_folder):
    assert available_detection_readers() == ["coco", "voc", "yolo"]
    for name, root in det_datasets.items():
        assert detect_detection_format(root) == name
    coco_file = det_datasets["coco"] / "annotations" / "instances_val2017.json"
    assert detect_detection_format(coco_file) == "coco"
    assert detect_detection_format(det_datasets["yolo"] / "data.yaml") == "yolo"
    # a single COCO file: its images only, root = the folder above annotations/
    single = read_detection(coco_file)
    assert single.root == det_datasets["coco"].resolve()
    assert sorted(s.path.name for s in single.samples) == ["img_c.png", "img_e.png"]
    assert detect_detection_format(image_folder) is None  # a classification layout
    with pytest.raises(DataError, match="not a detection dataset layout") as info:
        read_detection(image_folder)
    assert "coco" in str(info.value) and "yolo" in str(info.value)


def test_unknown_format_and_missing_path(tmp_path, det_datasets):
    with pytest.raises(ConfigError, match="did you mean 'yolo'"):
        read_detection(det_datasets["yolo"], format="yolov8")
    with pytest.raises(DataError, match="does not exist"):
        read_detection(tmp_path / "nowhere")


def test_explicit_format_reads_the_same(det_datasets):
    for name, root in det_datasets.items():
        assert read_detection(root, format=name).samples == read_detection(root).samples


# ----------------------------------------------------------------------------- COCO
def _coco(root: Path, obj: dict, name: str = "instances.json") -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    file = root / "annotations" / name
    file.write_text(json.dumps(obj) if isinstance(obj, dict) else obj)
    return file


def _one_image(root: Path, name="a.png", size=(20, 10)) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    draw(size, []).save(root / "images" / name)


def test_coco_category_ids_are_mapped_by_name_per_file(tmp_path):
    root = tmp_path / "ds"
    _one_image(root, "a.png")
    _one_image(root, "b.png")
    box = {"bbox": [1, 2, 3, 4], "iscrowd": 1}
    _coco(root, {
        "images": [{"id": 1, "file_name": "a.png"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, **box}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }, "instances_train.json")  # fmt: skip
    _coco(root, {
        "images": [{"id": 1, "file_name": "b.png"}],
        "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [0.5, 0, 2.25, 3]}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 9, "name": "cat"}],
    }, "instances_val.json")  # fmt: skip
    (root / "annotations" / "captions_train.json").write_text("{}")  # another task: ignored
    index = read_detection(root)
    samples = {s.path.name: s for s in index.samples}
    assert index.classes == ["cat", "dog"]
    assert samples["a.png"].labels == ("cat",) and samples["a.png"].split == "train"
    assert samples["a.png"].boxes == ((1.0, 2.0, 4.0, 6.0),)
    assert samples["a.png"].iscrowd == (True,)
    assert samples["b.png"].labels == ("dog",) and samples["b.png"].split == "val"
    assert samples["b.png"].boxes == ((0.5, 0.0, 2.75, 3.0),)
    assert samples["b.png"].box_sources == ("annotations/instances_val.json:annotation 5",)


def test_coco_roboflow_layout(tmp_path):
    root = tmp_path / "rf"
    for split in ("train", "valid"):
        (root / split).mkdir(parents=True)
        draw((16, 16), []).save(root / split / f"{split}.jpg")
        (root / split / "_annotations.coco.json").write_text(json.dumps({
            "images": [{"id": 0, "file_name": f"{split}.jpg", "width": 16, "height": 16}],
            "annotations": [{"id": 0, "image_id": 0, "category_id": 1, "bbox": [1, 1, 5, 5]}],
            "categories": [{"id": 0, "name": "objects"}, {"id": 1, "name": "ball"}],
        }))  # fmt: skip
    index = read_detection(root)
    assert index.format == "coco"
    assert [(s.path.name, s.split) for s in index.samples] == [
        ("train.jpg", "train"),
        ("valid.jpg", "val"),
    ]
    assert index.classes == ["ball", "objects"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"images": [}', r"instances.json: malformed JSON at line 1, column 13"),
        ("[1, 2]", "expected a JSON object"),
        ('{"annotations": []}', "no 'images' list"),
        ("[" * 100000 + "]" * 100000, "nested too deeply|malformed"),
    ],
)
def test_coco_malformed_json(tmp_path, text, match):
    file = _coco(tmp_path / "ds", text)
    with pytest.raises(DataError, match=match) as info:
        read_detection(file, format="coco")
    assert "instances.json" in str(info.value)


_IMG = {"id": 1, "file_name": "a.png"}
_CATS = [{"id": 1, "name": "cat"}]


@pytest.mark.parametrize(
    ("obj", "match"),
    [
        (
            {"images": [_IMG], "categories": _CATS, "annotations": [
                {"id": 17, "image_id": 1, "category_id": 1, "bbox": [1, "two", 3, 4]}]},
            r"instances.json:annotation 17: bbox\[1\] is 'two', not a number",
        ),
        (
            {"images": [_IMG], "categories": _CATS, "annotations": [
                {"id": 17, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]},
            r"annotation 17: bbox is \[1, 2, 3\]; expected \[x, y, width, height\]",
        ),
        (
            {"images": [_IMG], "categories": _CATS, "annotations": [
                {"image_id": 1, "category_id": 1, "bbox": [1, 2, float("nan"), 4]}]},
            r"instances.json:annotations\[0\]: bbox\[2\] is nan; it must be a finite number",
        ),
        (
            {"images": [_IMG], "categories": _CATS, "annotations": [
                {"id": 3, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "iscrowd": 2}]},
            "annotation 3: iscrowd is 2",
        ),
        (
            {"images": [{"id": 1, "file_name": "../../../etc/passwd"}], "categories": _CATS},
            r"instances.json:images\[0\] \(id 1\): path '../../../etc/passwd' escapes the "
            "dataset root",
        ),
        (
            {"images": [{"id": 1, "file_name": "/etc/passwd"}], "categories": _CATS},
            "escapes the dataset root",
        ),
        (
            {"images": [_IMG, _IMG], "categories": _CATS},
            r"images\[1\]: image id 1 appears twice",
        ),
        (
            {"images": [{"id": 1, "file_name": "a.png", "width": "20", "height": 10}],
             "categories": _CATS},
            r"images\[0\]: width is '20', not a number",
        ),
        (
            {"images": [_IMG], "categories": [{"id": 1, "name": ""}]},
            r"categories\[0\]: name is ''",
        ),
        (
            {"images": [_IMG], "categories": [{"id": 1.5, "name": "x"}]},
            r"categories\[0\]: id is 1.5; expected an integer",
        ),
    ],
)  # fmt: skip
def test_coco_bad_entries_name_file_and_entry(tmp_path, obj, match):
    root = tmp_path / "ds"
    _one_image(root)
    _coco(root, obj)
    with pytest.raises(DataError, match=match):
        read_detection(root)


def test_coco_symlink_out_of_root_is_refused(tmp_path):
    root = tmp_path / "ds"
    secret = tmp_path / "secret.png"
    draw((8, 8), []).save(secret)
    (root / "images").mkdir(parents=True)
    (root / "images" / "link.png").symlink_to(secret)
    _coco(root, {"images": [{"id": 1, "file_name": "link.png"}], "categories": _CATS})
    with pytest.raises(DataError, match=r"link\.png' escapes the dataset root"):
        read_detection(root)


# ----------------------------------------------------------------------------- VOC
def _voc(root: Path, stem: str, text: str) -> Path:
    (root / "Annotations").mkdir(parents=True, exist_ok=True)
    file = root / "Annotations" / f"{stem}.xml"
    file.write_text(text)
    return file


def test_voc_one_based_inclusive_convention(tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    draw((20, 10), []).save(root / "JPEGImages" / "a.png")
    # the whole image in VOC's 1-based inclusive indices, and a single pixel at (3, 4)
    _voc(root, "a", voc_xml("a.png", (20, 10), [("all", (0, 0, 20, 10)), ("dot", (3, 4, 4, 5))]))
    text = (root / "Annotations" / "a.xml").read_text()
    assert "<xmin>1</xmin><ymin>1</ymin><xmax>20</xmax><ymax>10</ymax>" in text
    (s,) = read_detection(root).samples
    assert s.boxes == ((0.0, 0.0, 20.0, 10.0), (3.0, 4.0, 4.0, 5.0))
    assert s.split is None and s.difficult == (False, False)


def test_voc_filename_fallbacks_difficult_and_trainval(tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    draw((10, 10), []).save(root / "JPEGImages" / "b.jpg")
    draw((12, 10), []).save(root / "c.png")  # LabelImg style: next to nothing, in the root
    hard = "<object><name> cat </name><difficult>1</difficult><bndbox><xmin>2</xmin>"
    hard += "<ymin>2</ymin><xmax>5.5</xmax><ymax>6</ymax></bndbox></object>"
    _voc(
        root, "b", f"<annotation><size><width>0</width><height>0</height></size>{hard}</annotation>"
    )
    _voc(root, "c", "<annotation><filename>c.png</filename></annotation>")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("b\nc\n")
    index = read_detection(root)
    b, c = index.samples
    assert b.path == root.resolve() / "JPEGImages" / "b.jpg"  # no <filename>: found by stem
    assert b.labels == ("cat",) and b.difficult == (True,)
    assert b.boxes == ((1.0, 1.0, 5.5, 6.0),)
    assert c.path == root.resolve() / "c.png" and len(c) == 0
    assert b.split == c.split == "train"
    assert index.issues == []  # a declared 0x0 size declares nothing


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<annotation><object></annotation>", r"a.xml: malformed XML at line 1, column \d+"),
        ("<notes/>", "root element is <notes>"),
        (
            '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 '
            '"&lol;&lol;&lol;">]>\n<annotation><filename>&lol2;</filename></annotation>',
            "document type declarations and entities are refused",
        ),
        (
            '<!DOCTYPE a SYSTEM "file:///etc/passwd"><annotation/>',
            "document type declarations",
        ),
        (
            "<annotation>\n<object><name>cat</name>\n<bndbox><xmin>1</xmin><ymin>abc</ymin>"
            "<xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>",
            r"Annotations/a.xml:object 1 \(line 2\): ymin is 'abc', not a number",
        ),
        (
            "<annotation><object><name>cat</name></object></annotation>",
            r"a.xml:object 1 \(line 1\): <bndbox> is missing",
        ),
        (
            "<annotation><object><bndbox/></object></annotation>",
            "object 1.*<name> is missing or empty",
        ),
        (
            "<annotation><object><name>x</name><difficult>maybe</difficult><bndbox><xmin>1"
            "</xmin><ymin>1</ymin><xmax>3</xmax><ymax>4</ymax></bndbox></object></annotation>",
            "<difficult> is 'maybe'",
        ),
        (
            "<annotation><filename>../../outside.png</filename></annotation>",
            "a.xml: <filename>: path '../../outside.png' escapes the dataset root",
        ),
        (
            "<annotation><size><width>ten</width><height>5</height></size></annotation>",
            "a.xml:<size> \\(line 1\\): width is 'ten'",
        ),
    ],
)
def test_voc_malformed_xml_names_file_and_entry(tmp_path, text, match):
    root = tmp_path / "voc"
    _voc(root, "a", text)
    with pytest.raises(DataError, match=match):
        read_detection(root)


def test_voc_image_in_two_splits_is_an_error(tmp_path):
    root = write_voc(tmp_path / "voc")
    with open(root / "ImageSets" / "Main" / "val.txt", "a") as fh:
        fh.write("img_a\n")
    with pytest.raises(DataError, match=r"val\.txt and .*train\.txt both list 'img_a'"):
        read_detection(root)


# ----------------------------------------------------------------------------- YOLO
def _yolo_root(tmp_path: Path) -> Path:
    root = tmp_path / "y"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    draw((20, 10), []).save(root / "images" / "a.png")
    return root


def test_yolo_classes_txt_polygons_and_negatives(tmp_path):
    root = _yolo_root(tmp_path)
    draw((20, 10), []).save(root / "images" / "neg.png")
    (root / "classes.txt").write_text("cat\ndog\n\n")
    # a box line, a polygon (segmentation) line, a comment and a blank line
    (root / "labels" / "a.txt").write_text(
        "1 0.5 0.5 0.5 0.4\n# comment\n\n0 0.1 0.2 0.3 0.2 0.2 0.6\n"
    )
    (root / "labels" / "neg.txt").write_text("")
    index = read_detection(root)
    assert index.format == "yolo" and index.classes == ["cat", "dog"]
    a, neg = index.samples
    assert a.labels == ("dog", "cat")
    assert a.boxes[0] == pytest.approx((5.0, 3.0, 15.0, 7.0))
    assert a.boxes[1] == pytest.approx((2.0, 2.0, 6.0, 6.0))  # the polygon's bounding box
    assert a.box_sources == ("labels/a.txt:1", "labels/a.txt:4")
    assert len(neg) == 0 and neg.split is None


def test_yolo_roboflow_yaml_and_names_list(tmp_path):
    root = tmp_path / "rf"
    for split in ("train", "valid"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        draw((10, 10), []).save(root / split / "images" / f"{split}.jpg")
        (root / split / "labels" / f"{split}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text(
        "train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['ball']\n"
        "path: /somewhere/else/entirely\n"
    )
    index = read_detection(root)
    assert [(s.path.name, s.split, s.labels) for s in index.samples] == [
        ("train.jpg", "train", ("ball",)),
        ("valid.jpg", "val", ("ball",)),
    ]
    # without the yaml, the <split>/images + <split>/labels folders still read (names needed)
    (root / "data.yaml").unlink()
    (root / "classes.txt").write_text("ball\n")
    assert read_detection(root).samples == index.samples


def test_yolo_list_file_split(tmp_path):
    root = _yolo_root(tmp_path)
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 1 1\n")
    (root / "train.txt").write_text("./images/a.png\n")
    (root / "data.yaml").write_text("train: train.txt\nnames: {0: thing}\n")
    (s,) = read_detection(root / "data.yaml").samples
    assert (s.split, s.labels, s.boxes) == ("train", ("thing",), ((0.0, 0.0, 20.0, 10.0),))


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"labels/a.txt": "0 0.5 abc 0.1 0.1\n"}, r"labels/a.txt:1: value 2 is 'abc'"),
        ({"labels/a.txt": "0 0.5 0.5 0.1 nan\n"}, r"labels/a.txt:1: value 4 is 'nan'"),
        ({"labels/a.txt": "\n0 0.5 0.5 0.1\n"}, r"labels/a.txt:2: expected 'class cx cy w h'"),
        ({"labels/a.txt": "cat 0.5 0.5 0.1 0.1\n"}, r"labels/a.txt:1: the class id is 'cat'"),
        ({"labels/a.txt": "0.5 0.5 0.5 0.1 0.1\n"}, "class id '0.5' is not a whole number"),
        ({"data.yaml": "names: [a, b\n"}, r"data.yaml: malformed YAML at line \d+"),
        ({"data.yaml": "- a\n- b\n"}, "data.yaml: expected a mapping"),
        ({"data.yaml": "names: [a, a]\n"}, "class ids 0 and 1 are both named 'a'"),
        ({"data.yaml": "names: {zero: a}\n"}, "key 'zero' is not a class id"),
        ({"data.yaml": "names: [a]\nnc: 2\n"}, "nc is 2 but names lists 1"),
        ({"data.yaml": "names: [a]\ntrain: /etc\n"}, "data.yaml: train: path '/etc' escapes"),
        ({"data.yaml": "names: [a]\ntrain: ../../../x\n"}, "escapes the dataset root"),
        ({"data.yaml": "names: [a]\ntrain: nowhere/\n"}, "is not a folder of images"),
        ({"data.yaml": "names: [[1, 2]]\n"}, r"names\[0\]: class name \[1, 2\] is not text"),
        ({"data.yaml": "train: images\n"}, "no class names found"),
    ],
)
def test_yolo_malformed_names_file_and_line(tmp_path, files, match):
    root = _yolo_root(tmp_path)
    if "data.yaml" not in files:
        (root / "data.yaml").write_text("names: [a, b]\n")
    for name, text in files.items():
        (root / name).write_text(text)
    with pytest.raises(DataError, match=match):
        read_detection(root)


def test_yolo_orphan_label_and_unknown_class_are_issues(tmp_path):
    root = _yolo_root(tmp_path)
    (root / "classes.txt").write_text("cat\n")
    (root / "labels" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n3 0.5 0.5 0.2 0.2\n")
    (root / "labels" / "ghost.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.1 0.1 0.1 0.1\n")
    index = read_detection(root)
    (s,) = index.samples
    assert s.labels == ("cat",)
    kinds = {(i.kind, i.source) for i in index.issues}
    assert kinds == {("unknown_class", "labels/a.txt:2"), ("missing_image", "labels/ghost.txt")}
    ghost = next(i for i in index.issues if i.kind == "missing_image")
    assert "2 box(es)" in ghost.message


# ----------------------------------------------------------------------------- records
def test_image_size_comes_from_the_header_with_exif_orientation(tmp_path):
    root = tmp_path / "voc"
    (root / "JPEGImages").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 30x20, seen as 20x30
    Image.new("RGB", (30, 20), (0, 0, 0)).save(root / "JPEGImages" / "r.jpg", exif=exif)
    _voc(root, "r", voc_xml("r.jpg", (30, 20), []))
    index = read_detection(root)
    (s,) = index.samples
    assert (s.width, s.height) == (20, 30)
    (issue,) = index.issues
    assert issue.kind == "size_mismatch" and issue.source == "Annotations/r.xml"
    assert "declares 30x20" in issue.message and "20x30" in issue.message


def test_index_json_round_trip(det_datasets, tmp_path):
    index = read_detection(det_datasets["coco"])
    again = DetectionIndex.from_json(json.loads(json.dumps(index.to_json())))
    assert again.samples == index.samples and again.classes == index.classes
    assert [s.box_sources for s in again.samples] == [s.box_sources for s in index.samples]
    saved = index.save(tmp_path / "index.json")
    assert DetectionIndex.load(saved).samples == index.samples
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(DataError, match=r"bad\.json: not a detection index"):
        DetectionIndex.load(tmp_path / "bad.json")


def test_sample_validates_its_fields():
    with pytest.raises(ValueError, match="labels has 0 entries for 1 boxes"):
        DetectionSample(path=Path("a.png"), width=4, height=4, boxes=((0, 0, 1, 1),))
    s = DetectionSample(path=Path("a.png"), width=4, height=4, boxes=((0, 0, 1, 1),), labels=("x",))
    assert s.iscrowd == s.difficult == (False,)
    assert s.boxes == ((0.0, 0.0, 1.0, 1.0),)


def test_detection_split_uses_given_splits_or_stratifies(det_datasets):
    index = read_detection(det_datasets["voc"])
    split = detection_split(index)
    assert split.method == "given"
    names = {
        k: sorted(index.samples[i].path.name for i in split[k]) for k in ("train", "val", "test")
    }
    assert names == {
        "train": ["img_a.png", "img_b.png"],
        "val": ["img_c.png", "img_e.png"],
        "test": ["img_d.png"],
    }
    unsplit = DetectionIndex(
        root=index.root,
        samples=[replace(s, split=None) for s in index.samples] * 4,
        classes=index.classes,
    )
    first = detection_split(unsplit, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert first.method == "stratified"
    assert first == detection_split(unsplit, val_fraction=0.25, test_fraction=0.25, seed=3)
    assert sorted(first.train + first.val + first.test) == list(range(len(unsplit)))
    assert all(first.sizes()[k] > 0 for k in ("train", "val", "test"))
