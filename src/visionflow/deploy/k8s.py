"""Kubernetes manifests for a distributed hyper-parameter search.

``visionflow train --storage URL`` is the coordinator of a search: it checks and splits the data,
creates the study in a database, runs trials, and refits the best configuration when the search
phase of the budget ends. ``visionflow worker --study NAME`` joins that study from any number of
other machines. On Kubernetes this becomes:

* a Secret with the study database URL (``VISIONFLOW_STORAGE``, which both commands read when
  ``--storage`` is not given), so no password is ever on a command line or in ``kubectl describe``;
* a PostgreSQL StatefulSet and its Service, unless an external database URL is given;
* PersistentVolumeClaims for the data (mounted read-only) and the run directory (ReadWriteMany:
  the coordinator and every worker write trial folders into it);
* a coordinator Job and a worker Job (``parallelism`` = ``completions`` = the number of workers),
  mounting both volumes at the same paths, ``/data`` and ``/runs``, because the workers read the
  data path and run directory from the study itself.

:func:`tune_manifests` returns the manifests as plain dicts (easy to test and to post-process);
:func:`write_tune_manifests` writes them as YAML with a ``kustomization.yaml``, the Dockerfile
and a short README, ready for ``kubectl apply -k``. Nothing here talks to a cluster.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shlex
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from visionflow._io import atomic_write_bytes
from visionflow.errors import BudgetError, ConfigError
from visionflow.train.budget import parse_budget

__all__ = [
    "DATA_MOUNT",
    "DEFAULT_IMAGE",
    "DEFAULT_SERVE_NAME",
    "NOT_APPLIED",
    "REGISTRY_DB_ENV",
    "REGISTRY_MOUNT",
    "RUNS_MOUNT",
    "dockerfile_text",
    "serve_dockerfile_text",
    "serve_manifests",
    "tune_manifests",
    "write_serve_manifests",
    "write_tune_manifests",
]

#: Where every pod sees the data volume (read-only) and the run volume.
DATA_MOUNT = "/data"
RUNS_MOUNT = "/runs"
DEFAULT_IMAGE = "visionflow:0.1.0"
#: Written next to the manifests but left out of kustomization.yaml: a helper pod to copy data
#: onto the volumes and the final model off them, started by hand when needed.
NOT_APPLIED = frozenset({"files-pod.yaml"})

_POSTGRES_IMAGE = "postgres:16"
_POSTGRES_PORT = 5432
_POSTGRES_USER = "visionflow"
_POSTGRES_DB = "visionflow"
_POSTGRES_UID = 999  # the postgres user of the official image
_APP_UID = 10001  # the visionflow user of our Dockerfile
_WORKER_WAIT_S = 900

# Derived names add at most 12 characters ("-coordinator"); pods add "-xxxxx" and StatefulSet
# revisions "-<10 char hash>" to their owner's name, and all of these must stay DNS labels
# (<= 63 characters), hence the margin.
_MAX_NAME = 43
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|m|k|M|G|T|P|E)?$")
_SUFFIX = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
    "Pi": 2.0**50,
    "Ei": 2.0**60,
}
# Options the manifests set themselves: given again in extra_args they would silently disagree
# with the volumes, the study or the worker Job (and --storage would put a password in the spec).
_RESERVED_ARGS = ("--name", "--out", "--budget", "--workers", "--storage", "--resume")


def tune_manifests(
    *,
    name: str,
    data_path: str,
    budget: str,
    workers: int,
    image: str,
    namespace: str | None = None,
    database_url: str | None = None,
    gpus: int = 0,
    cpu: str = "2",
    memory: str = "8Gi",
    data_claim: str | None = None,
    runs_claim: str | None = None,
    data_size: str = "20Gi",
    runs_size: str = "20Gi",
    database_size: str = "5Gi",
    storage_class: str | None = None,
    extra_args: Sequence[str] = (),
    db_password: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Build the manifests of a distributed search, as ``file name -> documents``.

    Args:
        name: Study and run name; also the prefix of every object (a DNS-1123 label).
        data_path: The dataset as the pods see it: ``/data`` or a path below it.
        budget: Wall-clock budget of the whole run (``"1h"``, ``"90m"``...); it must be finite,
            because the workers stop at the search deadline it defines.
        workers: Worker pods (the coordinator runs one more trial process of its own).
        image: The visionflow image (built from the Dockerfile) every pod runs.
        namespace: Namespace of every object; ``None`` leaves it to ``kubectl``'s context.
        database_url: An existing study database (PostgreSQL or MySQL URL); ``None`` deploys a
            PostgreSQL StatefulSet with a generated password.
        gpus: GPUs per coordinator and worker pod (``nvidia.com/gpu``); 0 for CPU only.
        cpu: CPU request of each pod (a Kubernetes quantity); also sets ``OMP_NUM_THREADS``,
            because PyTorch otherwise starts one thread per core of the *node*.
        memory: Memory request and limit of each pod.
        data_claim: An existing claim holding the data; ``None`` creates ``<name>-data``.
        runs_claim: An existing ReadWriteMany claim for the runs; ``None`` creates
            ``<name>-runs``.
        data_size: Size of a created data claim.
        runs_size: Size of a created runs claim.
        database_size: Size of the built-in database's volume.
        storage_class: Storage class of created claims; ``None`` uses the cluster's default
            (which must offer ReadWriteMany for the shared volumes).
        extra_args: More ``visionflow train`` options (``--backbone``, ``--preset``...); the
            workers read them from the study.
        db_password: Password of the built-in database; ``None`` generates one. Pass the old one
            when regenerating manifests for a database that is already initialised.

    Returns:
        Documents per file name, in apply order. ``files-pod.yaml`` (see :data:`NOT_APPLIED`)
        is a helper pod that ``kubectl apply -k`` leaves alone.

    Raises:
        ConfigError: a name, path, quantity or count is not valid; the message names it.
        BudgetError: the budget is not a finite duration.
    """
    _check_label(name, "--name", max_len=_MAX_NAME)
    if namespace is not None:
        _check_label(namespace, "--namespace", max_len=63)
    for claim, flag in ((data_claim, "--data-claim"), (runs_claim, "--runs-claim")):
        if claim is not None:
            _check_subdomain(claim, flag)
    if storage_class is not None:
        _check_subdomain(storage_class, "--storage-class")
    data = _check_data_path(data_path)
    budget = _check_budget(budget)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"--workers must be an integer >= 1, got {workers!r}")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ConfigError(f"--gpus must be an integer >= 0, got {gpus!r}")
    cores = _quantity(cpu, "--cpu")
    mem = _quantity(memory, "--memory")
    if mem < 64 * 2**20:
        raise ConfigError(
            f"--memory {memory!r} is less than 64 MiB; quantities without a suffix are bytes "
            "(did you mean e.g. '8Gi'?)"
        )
    for size, flag in (
        (data_size, "--data-size"),
        (runs_size, "--runs-size"),
        (database_size, "--database-size"),
    ):
        _quantity(size, flag)
    _check_image(image)
    extra = _check_extra_args(extra_args)
    if database_url is not None:
        _check_database_url(database_url)
    if db_password is not None and not re.fullmatch(r"[A-Za-z0-9_-]{16,}", db_password):
        raise ConfigError("the database password must be 16 or more URL-safe characters")

    builtin_db = database_url is None
    password = db_password or secrets.token_urlsafe(24)
    secret_name = f"{name}-db"
    data_claim_name = data_claim or f"{name}-data"
    runs_claim_name = runs_claim or f"{name}-runs"
    db_host = f"{name}-postgres"

    def meta(obj_name: str, component: str) -> dict[str, Any]:
        return _meta(obj_name, name, component, namespace)

    files: dict[str, list[dict[str, Any]]] = {}

    if builtin_db:
        url = f"postgresql://{_POSTGRES_USER}:{password}@{db_host}:{_POSTGRES_PORT}/{_POSTGRES_DB}"
        string_data = {"POSTGRES_PASSWORD": password, "VISIONFLOW_STORAGE": url}
    else:
        string_data = {"VISIONFLOW_STORAGE": str(database_url)}
    files["secret.yaml"] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": meta(secret_name, "database"),
            "type": "Opaque",
            "stringData": string_data,
        }
    ]

    claims = []
    if data_claim is None:
        # ReadWriteMany rather than ReadOnlyMany: an empty read-only volume could never be
        # filled. The jobs still mount it read-only.
        claims.append(
            _claim(meta(data_claim_name, "data"), "ReadWriteMany", data_size, storage_class)
        )
    if runs_claim is None:
        claims.append(
            _claim(meta(runs_claim_name, "runs"), "ReadWriteMany", runs_size, storage_class)
        )
    if claims:
        files["volumes.yaml"] = claims

    if builtin_db:
        files["database.yaml"] = _database(
            meta=meta,
            name=name,
            host=db_host,
            secret_name=secret_name,
            size=database_size,
            storage_class=storage_class,
        )

    env: list[dict[str, Any]] = [
        {
            "name": "VISIONFLOW_STORAGE",
            "valueFrom": {"secretKeyRef": {"name": secret_name, "key": "VISIONFLOW_STORAGE"}},
        },
        {"name": "OMP_NUM_THREADS", "value": str(max(1, math.ceil(cores - 1e-9)))},
    ]
    resources_: dict[str, Any] = {
        "requests": {"cpu": cpu, "memory": memory},
        # a memory limit equal to the request: an over-eager trial is OOM-killed (its heartbeat
        # stops and it is failed) instead of starving its neighbours; no CPU limit, which would
        # only throttle
        "limits": {"memory": memory},
    }
    if gpus:
        resources_["limits"]["nvidia.com/gpu"] = str(gpus)
    wait_for_db = _wait_for_db(db_host) if builtin_db else None

    def pod(component: str, command: list[str]) -> dict[str, Any]:
        return _job_pod(
            labels=_labels(name, component),
            image=image,
            command=command,
            env=env,
            resources=resources_,
            data_claim=data_claim_name,
            runs_claim=runs_claim_name,
            gpus=gpus,
            init=wait_for_db,
        )

    train_cmd = [
        "visionflow",
        "train",
        data,
        "--name",
        name,
        "--out",
        RUNS_MOUNT,
        "--budget",
        budget,
        "--workers",
        "1",
        *extra,
    ]
    files["coordinator.yaml"] = [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta(f"{name}-coordinator", "coordinator"),
            "spec": {
                # a restarted coordinator re-runs the same command, which resumes the study
                "backoffLimit": 3,
                "template": pod("coordinator", train_cmd),
            },
        }
    ]
    worker_cmd = ["visionflow", "worker", "--study", name, "--wait", str(_WORKER_WAIT_S)]
    files["workers.yaml"] = [
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": meta(f"{name}-workers", "worker"),
            "spec": {
                "parallelism": workers,
                "completions": workers,
                # each worker may fail a couple of times (database not ready, node lost) before
                # the Job gives up; a worker that exits at the deadline counts as complete
                "backoffLimit": max(6, 2 * workers),
                "template": pod("worker", worker_cmd),
            },
        }
    ]
    files["files-pod.yaml"] = [
        _files_pod(
            meta=meta(f"{name}-files", "files"),
            image=image,
            data_claim=data_claim_name,
            data_read_only=data_claim is not None,
            runs_claim=runs_claim_name,
        )
    ]
    # a JSON round trip: no object is shared between documents (YAML would write anchors and
    # aliases for them, and a caller editing one document would edit the others)
    result: dict[str, list[dict[str, Any]]] = json.loads(json.dumps(files))
    return result


def write_tune_manifests(out_dir: str | os.PathLike[str], **kwargs: Any) -> list[Path]:
    """Write the manifests of :func:`tune_manifests` as YAML, ready for ``kubectl apply -k``.

    Writes one file per component, ``kustomization.yaml`` (listing all but the helper pod), the
    ``Dockerfile`` to build the image from the visionflow sources, and a ``README.md``. When
    ``out_dir`` already holds a ``secret.yaml`` of the same built-in database, its password is
    kept: a regenerated secret would lock the pods out of the database volume, which PostgreSQL
    initialises only once. ``secret.yaml`` is written readable by its owner only.

    Args:
        out_dir: Folder to write into (created if missing).
        **kwargs: Keyword arguments of :func:`tune_manifests`.

    Returns:
        The paths written, in order.
    """
    out = Path(out_dir)
    if kwargs.get("database_url") is None and kwargs.get("db_password") is None:
        kwargs["db_password"] = _existing_password(out / "secret.yaml", kwargs.get("name"))
    files = tune_manifests(**kwargs)
    name = kwargs["name"]
    written: list[Path] = []
    for file_name, docs in files.items():
        header = (
            f"# Generated by `visionflow k8s tune` for the study {name!r}.\n"
            + (
                "# Holds the database password: keep it out of version control.\n"
                if file_name == "secret.yaml"
                else ""
            )
            + (
                "# Not part of kustomization.yaml: apply it by hand to copy data on or off the "
                "volumes.\n"
                if file_name in NOT_APPLIED
                else ""
            )
        )
        text = header + yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)
        mode = 0o600 if file_name == "secret.yaml" else 0o644
        written.append(_write(out / file_name, text, mode))
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
    }
    if kwargs.get("namespace"):
        kustomization["namespace"] = kwargs["namespace"]
    kustomization["resources"] = [f for f in files if f not in NOT_APPLIED]
    written.append(
        _write(out / "kustomization.yaml", yaml.safe_dump(kustomization, sort_keys=False), 0o644)
    )
    written.append(_write(out / "Dockerfile", dockerfile_text(), 0o644))
    written.append(_write(out / "README.md", _readme(files, out, **kwargs), 0o644))
    return written


def dockerfile_text() -> str:
    """The Dockerfile of the visionflow image, from the package data (one canonical copy)."""
    return (resources.files("visionflow.deploy") / "templates" / "Dockerfile").read_text(
        encoding="utf-8"
    )


# --------------------------------------------------------------------------- validation


def _check_label(value: str, flag: str, *, max_len: int) -> None:
    if not isinstance(value, str) or not _DNS_LABEL.match(value) or len(value) > max_len:
        raise ConfigError(
            f"{flag} {value!r} is not a valid Kubernetes name: use at most {max_len} lowercase "
            "letters, digits and '-', starting and ending with a letter or digit "
            "(e.g. 'flowers-search')"
        )


def _check_subdomain(value: str, flag: str) -> None:
    if not isinstance(value, str) or not _DNS_SUBDOMAIN.match(value) or len(value) > 253:
        raise ConfigError(
            f"{flag} {value!r} is not a valid Kubernetes name: use lowercase letters, digits, "
            "'-' and '.', starting and ending with a letter or digit"
        )


def _check_data_path(data_path: str) -> str:
    path = PurePosixPath(str(data_path))
    root = PurePosixPath(DATA_MOUNT)
    if not path.is_absolute() or ".." in path.parts or not (path == root or root in path.parents):
        raise ConfigError(
            f"DATA {str(data_path)!r} must be the path inside the pods, {DATA_MOUNT} or below it "
            f"(the data volume is mounted at {DATA_MOUNT}), e.g. {DATA_MOUNT}/flowers"
        )
    return str(path)


def _check_budget(budget: str) -> str:
    if parse_budget(budget) is None:
        raise BudgetError(
            f"budget {budget!r} has no end, but the workers of a distributed search stop at its "
            "deadline; give a duration such as '1h' or '6h'"
        )
    return str(budget).strip()


def _quantity(value: str, flag: str) -> float:
    match = _QUANTITY.match(str(value)) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(
            f"{flag} {value!r} is not a positive Kubernetes quantity "
            "(e.g. '2', '500m' for CPU; '8Gi', '512Mi' for memory and storage)"
        )
    return float(match.group(1)) * _SUFFIX[match.group(2)]


def _check_image(image: str) -> None:
    if not isinstance(image, str) or not image or re.search(r"\s", image):
        raise ConfigError(
            f"--image {image!r} is not an image reference "
            "(e.g. registry.example.com/visionflow:0.1.0)"
        )


def _check_extra_args(extra_args: Sequence[str]) -> list[str]:
    if isinstance(extra_args, str):
        raise ConfigError("extra_args must be a list of arguments, not one string")
    extra = [str(a) for a in extra_args]
    for arg in extra:
        if arg.split("=", 1)[0] in _RESERVED_ARGS:
            raise ConfigError(
                f"extra train argument {arg!r} is set by the manifests themselves; use the "
                "options of `visionflow k8s tune` instead (the database URL goes into the Secret)"
            )
    return extra


def _check_database_url(url: str) -> None:
    # never echo the URL: it usually holds a password
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme.startswith("sqlite"):
        raise ConfigError(
            "--database-url is an SQLite file, which pods on several nodes cannot share safely; "
            "use a PostgreSQL or MySQL URL, or leave it out to deploy PostgreSQL"
        )
    if not (scheme.startswith("postgresql") or scheme.startswith("mysql")):
        raise ConfigError(
            "--database-url must be a PostgreSQL or MySQL URL "
            "(postgresql://user:password@host:5432/db)"
        )


def _existing_password(path: Path, name: Any) -> str | None:
    """The built-in database password of an earlier ``secret.yaml`` of the same study."""
    if not path.is_file():
        return None
    try:
        docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    except (OSError, yaml.YAMLError):
        return None
    for doc in docs:
        if (
            isinstance(doc, dict)
            and doc.get("kind") == "Secret"
            and doc.get("metadata", {}).get("name") == f"{name}-db"
        ):
            password = (doc.get("stringData") or {}).get("POSTGRES_PASSWORD")
            return password if isinstance(password, str) else None
    return None


# --------------------------------------------------------------------------- building blocks


def _labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "visionflow",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "visionflow",
    }


def _meta(obj_name: str, app: str, component: str, namespace: str | None) -> dict[str, Any]:
    """An object's metadata: its name, the namespace when given, the app's labels."""
    out: dict[str, Any] = {"name": obj_name}
    if namespace is not None:
        out["namespace"] = namespace
    out["labels"] = _labels(app, component)
    return out


def _claim(
    meta: dict[str, Any], access_mode: str, size: str, storage_class: str | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": [access_mode],
        "resources": {"requests": {"storage": size}},
    }
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security(uid: int) -> dict[str, Any]:
    # the "restricted" Pod Security Standard; fsGroup makes fresh volumes writable by uid
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _pg_isready(host: str) -> list[str]:
    return [
        "pg_isready",
        "--host",
        host,
        "--port",
        str(_POSTGRES_PORT),
        "--username",
        _POSTGRES_USER,
        "--dbname",
        _POSTGRES_DB,
    ]


def _wait_for_db(host: str) -> dict[str, Any]:
    """An init container that holds a pod until the built-in database accepts connections."""
    probe = " ".join(_pg_isready(host))
    return {
        "name": "wait-for-database",
        "image": _POSTGRES_IMAGE,
        "command": [
            "sh",
            "-c",
            f"until {probe}; do echo 'waiting for the study database'; sleep 2; done",
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": _container_security(),
    }


def _database(
    *,
    meta: Callable[[str, str], dict[str, Any]],
    name: str,
    host: str,
    secret_name: str,
    size: str,
    storage_class: str | None,
) -> list[dict[str, Any]]:
    labels = _labels(name, "database")
    selector = {k: labels[k] for k in ("app.kubernetes.io/instance", "app.kubernetes.io/component")}
    probe = {"exec": {"command": _pg_isready("127.0.0.1")}}
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": size}},
    }
    if storage_class is not None:
        claim_spec["storageClassName"] = storage_class
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(host, "database"),
        # a ClusterIP (not headless) Service: its address survives a database pod restart, so
        # workers holding a cached DNS answer reconnect to the new pod
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [
                {
                    "name": "postgres",
                    "port": _POSTGRES_PORT,
                    "targetPort": "postgres",
                    "protocol": "TCP",
                }
            ],
        },
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": meta(host, "database"),
        "spec": {
            "serviceName": host,
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": False,
                    "enableServiceLinks": False,
                    "securityContext": _pod_security(_POSTGRES_UID),
                    "containers": [
                        {
                            "name": "postgres",
                            "image": _POSTGRES_IMAGE,
                            "ports": [{"name": "postgres", "containerPort": _POSTGRES_PORT}],
                            "env": [
                                {"name": "POSTGRES_USER", "value": _POSTGRES_USER},
                                {"name": "POSTGRES_DB", "value": _POSTGRES_DB},
                                {
                                    "name": "POSTGRES_PASSWORD",
                                    "valueFrom": {
                                        "secretKeyRef": {
                                            "name": secret_name,
                                            "key": "POSTGRES_PASSWORD",
                                        }
                                    },
                                },
                                # a sub-folder: the volume's root may hold lost+found, which
                                # initdb refuses
                                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
                            ],
                            # TCP to 127.0.0.1: during initdb the server listens only on its
                            # socket, so the pod turns ready only once the database exists
                            "readinessProbe": {**probe, "periodSeconds": 5, "timeoutSeconds": 5},
                            "livenessProbe": {
                                **probe,
                                "initialDelaySeconds": 60,
                                "periodSeconds": 20,
                                "timeoutSeconds": 5,
                                "failureThreshold": 6,
                            },
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "256Mi"},
                                "limits": {"memory": "1Gi"},
                            },
                            "securityContext": _container_security(),
                            "volumeMounts": [
                                {"name": "pgdata", "mountPath": "/var/lib/postgresql/data"}
                            ],
                        }
                    ],
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "pgdata"}, "spec": claim_spec}],
        },
    }
    return [service, statefulset]


def _volumes(data_claim: str, data_read_only: bool, runs_claim: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "data",
            "persistentVolumeClaim": {"claimName": data_claim, "readOnly": data_read_only},
        },
        {"name": "runs", "persistentVolumeClaim": {"claimName": runs_claim}},
    ]


def _job_pod(
    *,
    labels: dict[str, str],
    image: str,
    command: list[str],
    env: list[dict[str, Any]],
    resources: dict[str, Any],
    data_claim: str,
    runs_claim: str,
    gpus: int,
    init: dict[str, Any] | None,
) -> dict[str, Any]:
    """The pod template shared by the coordinator and the workers: same volumes, same paths."""
    container = {
        "name": "visionflow",
        "image": image,
        "command": command,
        "env": env,
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_MOUNT, "readOnly": True},
            {"name": "runs", "mountPath": RUNS_MOUNT},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    spec: dict[str, Any] = {
        # OnFailure: a crashed process restarts in place and re-joins (or resumes) the study
        "restartPolicy": "OnFailure",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": _pod_security(_APP_UID),
    }
    if init is not None:
        spec["initContainers"] = [init]
    spec["containers"] = [container]
    spec["volumes"] = [
        *_volumes(data_claim, True, runs_claim),
        # data-loader workers share batches through /dev/shm, 64 MiB by default in a container
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
    ]
    if gpus:
        spec["tolerations"] = [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {"metadata": {"labels": labels}, "spec": spec}


def _files_pod(
    *,
    meta: dict[str, Any],
    image: str,
    data_claim: str,
    data_read_only: bool,
    runs_claim: str,
) -> dict[str, Any]:
    """A pod that only sleeps, for ``kubectl cp`` of the data in and the final model out."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "restartPolicy": "Never",
            "activeDeadlineSeconds": 86400,  # a forgotten helper goes away after a day
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": _pod_security(_APP_UID),
            "containers": [
                {
                    "name": "files",
                    "image": image,
                    "command": ["sleep", "infinity"],
                    "resources": {
                        "requests": {"cpu": "50m", "memory": "64Mi"},
                        "limits": {"memory": "256Mi"},
                    },
                    "securityContext": _container_security(),
                    "volumeMounts": [
                        {"name": "data", "mountPath": DATA_MOUNT, "readOnly": data_read_only},
                        {"name": "runs", "mountPath": RUNS_MOUNT},
                    ],
                }
            ],
            "volumes": _volumes(data_claim, data_read_only, runs_claim),
        },
    }


def _write(path: Path, text: str, mode: int) -> Path:
    atomic_write_bytes(path, text.encode("utf-8"))
    path.chmod(mode)
    return path


def _readme(files: dict[str, list[dict[str, Any]]], out: Path, **kwargs: Any) -> str:
    """What is in the folder and the commands that use it, with this study's names filled in."""
    name = kwargs["name"]
    image = shlex.quote(str(kwargs["image"]))
    data_path = shlex.quote(str(PurePosixPath(kwargs["data_path"])))
    ns = f" -n {kwargs['namespace']}" if kwargs.get("namespace") else ""
    data_claim = kwargs.get("data_claim") or f"{name}-data"
    runs_claim = kwargs.get("runs_claim") or f"{name}-runs"
    builtin = "database.yaml" in files
    lines = [
        f"# Distributed search `{name}` on Kubernetes",
        "",
        "Generated by `visionflow k8s tune`; the full guide is docs/kubernetes.md in the "
        "visionflow sources.",
        "",
        "| file | what |",
        "|---|---|",
        "| `secret.yaml` | the study database URL (`VISIONFLOW_STORAGE`)"
        + (" and the PostgreSQL password" if builtin else "")
        + "; keep it out of version control |",
    ]
    if "volumes.yaml" in files:
        lines.append("| `volumes.yaml` | claims for the data and the runs (ReadWriteMany) |")
    if builtin:
        lines.append("| `database.yaml` | PostgreSQL (StatefulSet, Service) for the study |")
    lines += [
        "| `coordinator.yaml` | Job: `visionflow train` (creates the study, refits the best) |",
        "| `workers.yaml` | Job: `visionflow worker` pods joining the study |",
        "| `files-pod.yaml` | helper pod for `kubectl cp` (not in kustomization.yaml) |",
        "| `Dockerfile` | the image every pod runs |",
        "",
        "## Steps",
        "",
        "Step 1 runs in the visionflow source tree, the others in this folder.",
        "",
        "```console",
        "# 1. the image, built in the visionflow source tree",
        f"$ docker build -f {shlex.quote(str(out / 'Dockerfile'))} -t {image} . "
        f"&& docker push {image}",
    ]
    if kwargs.get("data_claim") is None:
        lines += [
            "# 2. the data onto its volume, through the helper pod",
            f"$ kubectl apply{ns} -f volumes.yaml -f files-pod.yaml",
            f"$ kubectl wait{ns} --for=condition=Ready pod/{name}-files",
            f"$ kubectl cp{ns} ./my-data {name}-files:{data_path}",
            f"$ kubectl delete{ns} pod {name}-files",
        ]
    else:
        lines.append(f"# 2. the data is already on the claim {data_claim} at {data_path}")
    lines += [
        "# 3. the search: database, coordinator and workers",
        "$ kubectl apply -k .",
        f"$ kubectl logs{ns} -f job/{name}-coordinator",
        f"$ kubectl wait{ns} --for=condition=complete job/{name}-coordinator --timeout=-1s",
        "# 4. the final model, off the runs volume",
        f"$ kubectl apply{ns} -f files-pod.yaml",
        f"$ kubectl wait{ns} --for=condition=Ready pod/{name}-files",
        f"$ kubectl cp{ns} {name}-files:{RUNS_MOUNT}/{name} ./{name}",
        f"$ kubectl delete{ns} pod {name}-files",
        "```",
        "",
        "## Why the runs volume is ReadWriteMany",
        "",
        "The coordinator and every worker pod write trial folders into the same run directory "
        f"(`{RUNS_MOUNT}/{name}`), and the pods are spread over several nodes; a ReadWriteOnce "
        "volume can be attached to one node only, so the second pod would wait forever. The "
        "workers also read the data path and run directory from the study, so every pod must "
        f"see the same files at the same paths (`{DATA_MOUNT}`, `{RUNS_MOUNT}`). "
        f"The data claim (`{data_claim}`) is mounted read-only by the jobs; when created here it "
        "is ReadWriteMany so that the helper pod can fill it. Storage classes with "
        "ReadWriteMany: NFS, CephFS, AWS EFS, GCP Filestore, Azure Files, Longhorn RWX.",
        "",
        f"Runs claim: `{runs_claim}`.",
    ]
    if builtin:
        lines += [
            "",
            "## Regenerating",
            "",
            "Running `visionflow k8s tune` again into this folder keeps the password of "
            "`secret.yaml`: PostgreSQL sets it only when its volume is first initialised.",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- serving

#: Where the serving pods see the model registry and the API key file.
REGISTRY_MOUNT = "/registry"
SECRETS_MOUNT = "/secrets"
DEFAULT_SERVE_NAME = "visionflow-serve"
#: The environment variable the serving container reads the registry database URL from.
REGISTRY_DB_ENV = "VISIONFLOW_REGISTRY_DB"
_DB_SECRET_KEY = "url"
_API_KEYS_SECRET_KEY = "keys"


def serve_manifests(
    *,
    image: str,
    name: str = DEFAULT_SERVE_NAME,
    namespace: str | None = None,
    replicas: int = 2,
    min_replicas: int = 2,
    max_replicas: int = 10,
    target_cpu: int = 70,
    registry_claim: str | None = None,
    registry_size: str = "10Gi",
    storage_class: str | None = None,
    db_secret: str | None = None,
    api_keys_secret: str | None = None,
    cpu: str = "1",
    memory: str = "2Gi",
    port: int = 8080,
) -> dict[str, list[dict[str, Any]]]:
    """Build the manifests of a ``visionflow serve`` deployment, as ``file name -> documents``.

    Args:
        image: The serving image (built from ``Dockerfile.serve``).
        name: Name of every object (a DNS-1123 label).
        namespace: Namespace of every object; ``None`` leaves it to ``kubectl``'s context.
        replicas: Initial replicas of the Deployment (between the autoscaler's bounds).
        min_replicas: Lower bound of the HorizontalPodAutoscaler.
        max_replicas: Upper bound of the HorizontalPodAutoscaler.
        target_cpu: Average CPU utilisation (percent of the request) the autoscaler aims at.
        registry_claim: An existing ReadWriteMany claim holding the registry; ``None`` creates
            ``<name>-registry`` of ``registry_size``.
        registry_size: Size of a created registry claim.
        storage_class: Storage class of a created claim (must offer ReadWriteMany).
        db_secret: A Secret whose key ``url`` is the registry's PostgreSQL URL; required in
            practice for several replicas (an SQLite file on a shared volume is not safe).
        api_keys_secret: A Secret whose key ``keys`` is the API key file (``--api-keys``).
        cpu: CPU request of each pod; the autoscaler's utilisation is relative to it.
        memory: Memory request and limit of each pod.
        port: The container port the server listens on.

    Raises:
        ConfigError: a name, quantity, count or port is not valid; the message names the flag.
    """
    _check_label(name, "--name", max_len=_MAX_NAME)
    if namespace is not None:
        _check_label(namespace, "--namespace", max_len=63)
    for value, flag in (
        (registry_claim, "--registry-pvc"),
        (storage_class, "--storage-class"),
        (db_secret, "--db-secret"),
        (api_keys_secret, "--api-keys-secret"),
    ):
        if value is not None:
            _check_subdomain(value, flag)
    _check_image(image)
    for value_, flag in (
        (replicas, "--replicas"),
        (min_replicas, "--min-replicas"),
        (max_replicas, "--max-replicas"),
    ):
        if isinstance(value_, bool) or not isinstance(value_, int) or value_ < 1:
            raise ConfigError(f"{flag} must be an integer >= 1, got {value_!r}")
    if min_replicas > max_replicas:
        raise ConfigError(
            f"--min-replicas {min_replicas} is more than --max-replicas {max_replicas}"
        )
    if not min_replicas <= replicas <= max_replicas:
        raise ConfigError(
            f"--replicas {replicas} must lie between --min-replicas {min_replicas} and "
            f"--max-replicas {max_replicas}"
        )
    if (
        isinstance(target_cpu, bool)
        or not isinstance(target_cpu, int)
        or not 1 <= target_cpu <= 100
    ):
        raise ConfigError(f"--target-cpu must be a percentage from 1 to 100, got {target_cpu!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1024 <= port <= 65535:
        # a non-root process cannot bind below 1024 (all capabilities are dropped)
        raise ConfigError(f"--port must be an integer from 1024 to 65535, got {port!r}")
    cores = _quantity(cpu, "--cpu")
    mem = _quantity(memory, "--memory")
    if mem < 64 * 2**20:
        raise ConfigError(
            f"--memory {memory!r} is less than 64 MiB; quantities without a suffix are bytes "
            "(did you mean e.g. '2Gi'?)"
        )
    _quantity(registry_size, "--registry-size")

    labels = _labels(name, "server")
    selector = {k: labels[k] for k in ("app.kubernetes.io/instance", "app.kubernetes.io/component")}
    claim_name = registry_claim or f"{name}-registry"

    def meta(obj_name: str, component: str) -> dict[str, Any]:
        return _meta(obj_name, name, component, namespace)

    files: dict[str, list[dict[str, Any]]] = {}
    if registry_claim is None:
        # ReadWriteMany: every replica, on any node, mounts the same registry
        files["registry-volume.yaml"] = [
            _claim(meta(claim_name, "registry"), "ReadWriteMany", registry_size, storage_class)
        ]

    args = [
        "serve",
        "--registry",
        REGISTRY_MOUNT,
        "--host",
        "0.0.0.0",  # inside the pod; the Service is what exposes it
        "--port",
        str(port),
        # ONNX Runtime would otherwise size its pool from the node's cores, not the pod's
        "--ort-threads",
        str(max(1, math.ceil(cores - 1e-9))),
    ]
    env: list[dict[str, Any]] = [
        # the root filesystem is read-only: caches and temporary files go to the /tmp emptyDir
        {"name": "HOME", "value": "/tmp"},
        {"name": "TMPDIR", "value": "/tmp"},
    ]
    if db_secret is not None:
        # the server has no environment variable for --db, so Kubernetes substitutes $(VAR)
        # into the argument; the URL stays out of the manifests and `kubectl describe`
        env.append(
            {
                "name": REGISTRY_DB_ENV,
                "valueFrom": {"secretKeyRef": {"name": db_secret, "key": _DB_SECRET_KEY}},
            }
        )
        args += ["--db", f"$({REGISTRY_DB_ENV})"]
    mounts: list[dict[str, Any]] = [
        {"name": "registry", "mountPath": REGISTRY_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},  # an emptyDir of the pod
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "registry", "persistentVolumeClaim": {"claimName": claim_name}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
    ]
    if api_keys_secret is not None:
        args += ["--api-keys", f"{SECRETS_MOUNT}/{_API_KEYS_SECRET_KEY}"]
        mounts.append({"name": "api-keys", "mountPath": SECRETS_MOUNT, "readOnly": True})
        volumes.append(
            {
                "name": "api-keys",
                "secret": {
                    "secretName": api_keys_secret,
                    "items": [{"key": _API_KEYS_SECRET_KEY, "path": _API_KEYS_SECRET_KEY}],
                    "defaultMode": 0o440,
                },
            }
        )

    def http_probe(path: str, **timing: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": "http"}, "timeoutSeconds": 5, **timing}

    container = {
        "name": "server",
        "image": image,
        "command": ["visionflow"],
        "args": args,
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "env": env,
        # the registry is scanned before the server listens: up to 10 minutes to start
        "startupProbe": http_probe("/healthz", periodSeconds=5, failureThreshold=120),
        # out of the Service until every aliased model version is loaded and warm
        "readinessProbe": http_probe("/readyz", periodSeconds=5, failureThreshold=2),
        "livenessProbe": http_probe("/healthz", periodSeconds=15, failureThreshold=4),
        "resources": {
            "requests": {"cpu": cpu, "memory": memory},
            # a memory limit equal to the request; no CPU limit, which would only throttle
            "limits": {"memory": memory},
        },
        "securityContext": {**_container_security(), "readOnlyRootFilesystem": True},
        "volumeMounts": mounts,
    }
    files["deployment.yaml"] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta(name, "server"),
            "spec": {
                # the autoscaler takes over from here
                "replicas": replicas,
                "revisionHistoryLimit": 5,
                "selector": {"matchLabels": selector},
                # a new version's pods must be ready (models warm) before an old one goes
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
                },
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(port),
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": {
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "terminationGracePeriodSeconds": 30,
                        "securityContext": _pod_security(_APP_UID),
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        }
    ]
    files["service.yaml"] = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(name, "server"),
            "spec": {
                "type": "ClusterIP",
                "selector": selector,
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
            },
        }
    ]
    files["hpa.yaml"] = [
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": meta(name, "server"),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                "minReplicas": min_replicas,
                "maxReplicas": max_replicas,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": target_cpu},
                        },
                    }
                ],
            },
        }
    ]
    result: dict[str, list[dict[str, Any]]] = json.loads(json.dumps(files))
    return result


def serve_dockerfile_text() -> str:
    """The Dockerfile of the serving image (non-root, ``HEALTHCHECK`` on ``/healthz``)."""
    return (resources.files("visionflow.deploy") / "templates" / "Dockerfile.serve").read_text(
        encoding="utf-8"
    )


def write_serve_manifests(out_dir: str | os.PathLike[str], **kwargs: Any) -> list[Path]:
    """Write the manifests of :func:`serve_manifests` as YAML, ready for ``kubectl apply -k``.

    Also writes ``kustomization.yaml``, ``Dockerfile.serve`` and a ``README.md``.

    Args:
        out_dir: Folder to write into (created if missing).
        **kwargs: Keyword arguments of :func:`serve_manifests`.

    Returns:
        The paths written, in order.
    """
    out = Path(out_dir)
    files = serve_manifests(**kwargs)
    name = kwargs.get("name", DEFAULT_SERVE_NAME)
    shared_db_note = (
        "# With more than one replica the registry database must be PostgreSQL (--db-secret):\n"
        "# an SQLite file on a shared network volume is not safe for several processes.\n"
    )
    written: list[Path] = []
    for file_name, docs in files.items():
        header = f"# Generated by `visionflow k8s serve` for {name!r}.\n"
        if file_name == "deployment.yaml":
            header += shared_db_note
        text = header + yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)
        written.append(_write(out / file_name, text, 0o644))
    kustomization: dict[str, Any] = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
    }
    if kwargs.get("namespace"):
        kustomization["namespace"] = kwargs["namespace"]
    kustomization["resources"] = list(files)
    written.append(
        _write(out / "kustomization.yaml", yaml.safe_dump(kustomization, sort_keys=False), 0o644)
    )
    written.append(_write(out / "Dockerfile.serve", serve_dockerfile_text(), 0o644))
    written.append(_write(out / "README.md", _serve_readme(files, out, **kwargs), 0o644))
    return written


def _serve_readme(files: dict[str, list[dict[str, Any]]], out: Path, **kwargs: Any) -> str:
    name = kwargs.get("name", DEFAULT_SERVE_NAME)
    image = shlex.quote(str(kwargs["image"]))
    ns = f" -n {kwargs['namespace']}" if kwargs.get("namespace") else ""
    claim = kwargs.get("registry_claim") or f"{name}-registry"
    db_secret = kwargs.get("db_secret")
    keys_secret = kwargs.get("api_keys_secret")
    lines = [
        f"# Model server `{name}` on Kubernetes",
        "",
        "Generated by `visionflow k8s serve`; the full guide is docs/kubernetes.md in the "
        "visionflow sources.",
        "",
        "| file | what |",
        "|---|---|",
    ]
    if "registry-volume.yaml" in files:
        lines.append(f"| `registry-volume.yaml` | the registry claim `{claim}` (ReadWriteMany) |")
    lines += [
        "| `deployment.yaml` | `visionflow serve --registry "
        f"{REGISTRY_MOUNT}`: probes on /readyz and /healthz, non-root, read-only root |",
        "| `service.yaml` | ClusterIP Service, port 80 |",
        "| `hpa.yaml` | HorizontalPodAutoscaler on CPU utilisation |",
        "| `Dockerfile.serve` | the serving image |",
        "",
        "## Steps",
        "",
        "```console",
        "# 1. the image, built in the visionflow source tree",
        f"$ docker build -f {shlex.quote(str(out / 'Dockerfile.serve'))} -t {image} . "
        f"&& docker push {image}",
    ]
    if db_secret:
        lines += [
            "# 2. the registry database URL (PostgreSQL), if the Secret does not exist yet",
            f"$ kubectl create secret generic{ns} {db_secret} "
            f"--from-literal={_DB_SECRET_KEY}='postgresql://user:password@host:5432/registry'",
        ]
    if keys_secret:
        lines += [
            "# API keys: lines from `visionflow serve --hash-key predict`",
            f"$ kubectl create secret generic{ns} {keys_secret} "
            f"--from-file={_API_KEYS_SECRET_KEY}=./api-keys.txt",
        ]
    lines += [
        "# 3. the server",
        "$ kubectl apply -k .",
        f"$ kubectl rollout status{ns} deployment/{name}",
        f"$ kubectl port-forward{ns} service/{name} 8080:80",
        "$ curl http://127.0.0.1:8080/readyz",
        "```",
        "",
        "## The registry",
        "",
        f"Every replica mounts the claim `{claim}` at `{REGISTRY_MOUNT}`, so it must be "
        "ReadWriteMany (NFS, CephFS, AWS EFS, GCP Filestore, Azure Files, Longhorn RWX). "
        "The servers poll it for new versions and alias moves. With more than one replica, "
        "keep the registry's database in PostgreSQL (`--db-secret`): an SQLite file on a "
        "network volume is not safe for several processes.",
        "",
        "The autoscaler's CPU utilisation is relative to the CPU request; it needs the "
        "metrics-server in the cluster. Pods carry `prometheus.io/*` annotations for "
        "`/metrics`.",
    ]
    return "\n".join(lines) + "\n"
