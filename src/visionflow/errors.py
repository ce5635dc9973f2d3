"""The one exception tree of visionflow.

Every error a user can cause is a :class:`VisionflowError`. Messages say what was wrong, where
(file, line, field) and how to fix it; the CLI prints them without a traceback and exits with
the code of the class (see ``exit_code``).
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "BundleError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ExportError",
    "ImageDecodeError",
    "MissingDependencyError",
    "RegistryError",
    "VisionflowError",
    "WeightsError",
]


class VisionflowError(Exception):
    """Base class of every error visionflow raises on purpose."""

    #: Process exit code used by the CLI for this kind of error.
    exit_code: int = 1


class ConfigError(VisionflowError, ValueError):
    """A setting is unknown, malformed or out of range."""

    exit_code = 2


class DataError(VisionflowError):
    """The dataset cannot be used as given (missing, unreadable, too small to split...)."""

    exit_code = 3


class ImageDecodeError(DataError):
    """One image file cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class WeightsError(VisionflowError):
    """Pretrained weights could not be found, loaded or verified."""

    exit_code = 4


class CheckpointError(VisionflowError):
    """A run directory or checkpoint is missing, incomplete or inconsistent."""

    exit_code = 5


class BudgetError(VisionflowError):
    """The time budget is malformed or too small to do anything useful."""

    exit_code = 2


class MissingDependencyError(VisionflowError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    exit_code = 6


class BundleError(VisionflowError):
    """A model bundle is missing, malformed, tampered with, truncated or unsafe to extract."""

    exit_code = 7


class ExportError(VisionflowError):
    """A model could not be exported, or an exported graph disagrees with PyTorch."""

    exit_code = 8


class RegistryError(VisionflowError):
    """A model registry operation was refused: unknown model, version or alias, a bad name,
    a version still aliased, or a registry database that cannot be reached."""

    exit_code = 9
