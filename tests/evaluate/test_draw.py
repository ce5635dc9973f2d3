"""Boxes drawn on images: colours, styles, copies, and refusals of malformed boxes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from visionflow.errors import DataError
from visionflow.evaluate.draw import PALETTE, class_colour, draw_detections


def _grey(width: int = 200, height: int = 150) -> Image.Image:
    return Image.new("RGB", (width, height), (90, 90, 90))


def test_class_colours_are_stable_and_follow_the_class_list():
    assert class_colour("cat") == class_colour("cat")  # same name, same colour, any process
    assert class_colour("cat") in PALETTE
    names = [f"class{k}" for k in range(len(PALETTE))]
    by_position = [class_colour(n, names) for n in names]
    assert by_position == list(PALETTE)  # no two classes of a model share a colour
    assert class_colour("unknown", names) == class_colour("unknown")


def test_prediction_boxes_are_solid_with_a_filled_tag_and_the_input_is_untouched():
    image = _grey()
    before = np.asarray(image).copy()
    out = draw_detections(image, [[50, 60, 150, 140]], ["cat"], [0.87], classes=["dog", "cat"])
    colour = PALETTE[1]
    assert out is not image and out.size == image.size and out.mode == "RGB"
    assert np.array_equal(np.asarray(image), before)
    px = np.asarray(out)
    # the left edge is solid from top to bottom, in the class colour
    assert (px[70:130, 50] == colour).all()
    # the tag sits above the box: a filled band of the colour holding some text pixels
    tag = px[50:60, 50:80].reshape(-1, 3)
    filled = (tag == colour).all(axis=1).mean()
    assert 0.4 < filled < 0.99
    # inside the box nothing changed
    assert (px[100, 100] == (90, 90, 90)).all()


def test_ground_truth_is_dashed_with_its_tag_below():
    out = draw_detections(
        _grey(), np.zeros((0, 4)), [], truth_boxes=[[40, 30, 160, 100]], truth_labels=["cat"]
    )
    px = np.asarray(out)
    edge = (px[30, 45:155] == class_colour("cat")).all(axis=1)
    assert 0.3 < edge.mean() < 0.8  # dashes: drawn and gaps along the top edge
    below = (px[101:115, 40:90].reshape(-1, 3) == class_colour("cat")).all(axis=1)
    assert below.mean() > 0.3  # the "(truth)" tag under the box


def test_nothing_to_draw_gives_an_equal_copy_and_greyscale_becomes_rgb():
    image = Image.new("L", (40, 30), 100)
    out = draw_detections(image, [], [])
    assert out.mode == "RGB" and np.array_equal(np.asarray(out)[..., 0], np.asarray(image))


def test_boxes_reaching_outside_and_tags_at_the_border_stay_inside():
    out = draw_detections(_grey(80, 60), [[-10, -10, 200, 200]], ["a very long class name"], [1.0])
    assert out.size == (80, 60)  # nothing raised, nothing grew


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"boxes": [[0, 0, 10]], "labels": ["a"]}, "N x 4"),
        ({"boxes": [[0, 0, 10, 10]], "labels": ["a", "b"]}, "1 boxes but 2 labels"),
        ({"boxes": [[0, 0, 10, 10]], "labels": ["a"], "scores": [0.5, 0.4]}, "2 scores"),
        ({"boxes": [[0, np.nan, 10, 10]], "labels": ["a"]}, "NaN"),
        ({"boxes": [], "labels": [], "truth_boxes": [[0, 0, 5, 5]]}, "need truth_labels"),
    ],
)
def test_malformed_boxes_are_refused_with_the_reason(kwargs, message):
    with pytest.raises(DataError, match=message):
        draw_detections(_grey(), **kwargs)
