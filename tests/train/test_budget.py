import pytest

from visionflow.errors import BudgetError
from visionflow.train.budget import Deadline, format_seconds, parse_budget


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("10m", 600), ("1h30m", 5400), ("1.5h", 5400), ("300", 300), (45, 45),
     ("2m 30s", 150), ("1d", 86400)],
)  # fmt: skip
def test_parse_budget(text, seconds):
    assert parse_budget(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "none", "inf"])
def test_no_budget(text):
    assert parse_budget(text) is None


@pytest.mark.parametrize("text", ["ten minutes", "10x", "m", "-5", "0s", "5m banana"])
def test_bad_budget_is_a_clear_error(text):
    with pytest.raises(BudgetError, match="budget"):
        parse_budget(text)


def test_deadline_counts_time_spent_before_a_resume():
    deadline = Deadline(100.0, spent=95.0)
    assert 0 < deadline.remaining() <= 5.0
    assert deadline.allows(1.0)
    assert not deadline.allows(10.0)
    assert Deadline(None).remaining() == float("inf")
    assert Deadline(1.0, spent=2.0).expired()


def test_format_seconds():
    assert format_seconds(5.25) == "5.2s"
    assert format_seconds(754) == "12m34s"
    assert format_seconds(7300) == "2h01m"
