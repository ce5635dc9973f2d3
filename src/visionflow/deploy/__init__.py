"""Deployment: manifests that run visionflow on a cluster (see docs/kubernetes.md).

Only plain dicts and YAML files are produced here; nothing talks to a cluster, so this package
needs no Kubernetes client.
"""

from __future__ import annotations

from visionflow.deploy.k8s import (
    DATA_MOUNT,
    DEFAULT_IMAGE,
    RUNS_MOUNT,
    dockerfile_text,
    tune_manifests,
    write_tune_manifests,
)

__all__ = [
    "DATA_MOUNT",
    "DEFAULT_IMAGE",
    "RUNS_MOUNT",
    "dockerfile_text",
    "tune_manifests",
    "write_tune_manifests",
]
