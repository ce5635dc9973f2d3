"""The typed records every reader produces and every later stage consumes.

A :class:`Sample` is one image on disk with its label. A :class:`DatasetIndex` is the list of
samples plus the class names, independent of the format it was read from. A :class:`Split`
assigns sample positions to train/val/test; it is saved in the run so the split is reproducible.
Detection (a later task) adds a ``target`` to the sample; the rest stays the same.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionflow.errors import DataError

__all__ = ["DatasetIndex", "Sample", "Split"]

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One image file and its label.

    Attributes:
        path: Absolute path of the image file.
        label: Class name, or ``None`` for an unlabelled image (prediction pools).
        split: ``"train"``, ``"val"`` or ``"test"`` when the source fixes the split, else ``None``.
        source: Where the record came from, for error messages (``"labels.csv:12"``).
    """

    path: Path
    label: str | None = None
    split: str | None = None
    source: str | None = None

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        path = self.path
        if root is not None:
            with contextlib.suppress(ValueError):
                path = self.path.relative_to(root)
        return {"path": path.as_posix(), "label": self.label, "split": self.split}

    @classmethod
    def from_json(cls, obj: dict[str, Any], root: Path | None = None) -> Sample:
        path = Path(obj["path"])
        if root is not None and not path.is_absolute():
            path = root / path
        return cls(path=path, label=obj.get("label"), split=obj.get("split"))


@dataclass
class DatasetIndex:
    """All samples of a dataset plus its class names (sorted, stable ids = positions)."""

    root: Path
    samples: list[Sample]
    classes: list[str] = field(default_factory=list)
    format: str = "unknown"

    def __post_init__(self) -> None:
        if not self.classes:
            self.classes = sorted({s.label for s in self.samples if s.label is not None})

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def targets(self) -> list[int]:
        """Integer class ids of every sample (raises for an unlabelled or unknown label)."""
        mapping = self.class_to_idx
        out = []
        for s in self.samples:
            if s.label is None or s.label not in mapping:
                raise DataError(f"{s.path}: label {s.label!r} is not one of {self.classes}")
            out.append(mapping[s.label])
        return out

    def counts(self) -> dict[str, int]:
        counter = Counter(s.label for s in self.samples if s.label is not None)
        return {name: counter.get(name, 0) for name in self.classes}

    def subset(self, positions: list[int]) -> DatasetIndex:
        """A new index with the samples at ``positions``; the class list is kept."""
        return DatasetIndex(
            root=self.root,
            samples=[self.samples[i] for i in positions],
            classes=list(self.classes),
            format=self.format,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "format": self.format,
            "classes": self.classes,
            "samples": [s.to_json(self.root) for s in self.samples],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> DatasetIndex:
        root = Path(obj["root"])
        return cls(
            root=root,
            samples=[Sample.from_json(s, root) for s in obj["samples"]],
            classes=list(obj["classes"]),
            format=obj.get("format", "unknown"),
        )


@dataclass
class Split:
    """Positions (into a :class:`DatasetIndex`) of the train, val and test samples."""

    train: list[int]
    val: list[int]
    test: list[int]
    seed: int | None = None
    method: str = "stratified"

    def __getitem__(self, name: str) -> list[int]:
        if name not in SPLIT_NAMES:
            raise KeyError(name)
        positions: list[int] = getattr(self, name)
        return positions

    def sizes(self) -> dict[str, int]:
        return {name: len(self[name]) for name in SPLIT_NAMES}

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seed": self.seed,
            "train": self.train,
            "val": self.val,
            "test": self.test,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Split:
        return cls(
            train=list(obj["train"]),
            val=list(obj["val"]),
            test=list(obj["test"]),
            seed=obj.get("seed"),
            method=obj.get("method", "stratified"),
        )
