"""The Kubernetes manifests of a distributed search, checked against the Kubernetes API schemas.

There is no cluster in the tests: every generated document is checked by the official
``kubernetes`` client's models (required fields, field types) and by a walk over their
``attribute_map`` that rejects unknown fields, which the models alone silently drop (a misspelt
``volumeMount`` would otherwise pass). Broken documents prove that the check bites.
"""

from __future__ import annotations

import copy
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

from visionflow.deploy import dockerfile_text, tune_manifests, write_tune_manifests
from visionflow.deploy.cli import k8s_app
from visionflow.deploy.k8s import NOT_APPLIED
from visionflow.errors import BudgetError, ConfigError

kubernetes = pytest.importorskip("kubernetes")
from k8s_schema import SchemaError, validator  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- schema check

_MODELS = {
    ("v1", "Secret"): "V1Secret",
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("v1", "Pod"): "V1Pod",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("batch/v1", "Job"): "V1Job",
}
validate = validator(_MODELS)


# --------------------------------------------------------------------------- helpers

BASE = {
    "name": "flowers",
    "data_path": "/data/flowers",
    "budget": "1h",
    "workers": 3,
    "image": "registry.example.com/visionflow:0.1.0",
}
CONFIGS = {
    "builtin-db": {},
    "external-db": {"database_url": "postgresql://vf:s3cret@db.example.com:5432/studies"},
    "gpu-namespace-claims": {
        "gpus": 2,
        "namespace": "ml-team",
        "data_claim": "imagenet-ro",
        "runs_claim": "shared-runs",
        "cpu": "500m",
        "memory": "16Gi",
        "extra_args": ["--backbone", "resnet50", "--preset", "best"],
    },
    "storage-class": {"storage_class": "efs.csi.aws.com", "workers": 1},
}


def _manifests(**overrides: Any) -> dict[str, list[dict[str, Any]]]:
    return tune_manifests(**{**BASE, **overrides})


def _all_docs(files: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return [doc for docs in files.values() for doc in docs]


def _job(files: dict[str, list[dict[str, Any]]], file_name: str) -> dict[str, Any]:
    (job,) = files[file_name]
    assert job["kind"] == "Job"
    return job


def _container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _pod_specs(files: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    specs = []
    for doc in _all_docs(files):
        if doc["kind"] in {"Job", "StatefulSet"}:
            specs.append(doc["spec"]["template"]["spec"])
        elif doc["kind"] == "Pod":
            specs.append(doc["spec"])
    return specs


def _walk(value: Any) -> list[Any]:
    """Every key and value in a nested document, to search for things that must not be there."""
    found = [value]
    if isinstance(value, dict):
        for k, v in value.items():
            found += [k, *_walk(v)]
    elif isinstance(value, list):
        for v in value:
            found += _walk(v)
    return found


# --------------------------------------------------------------------------- the schema check


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_document_matches_the_kubernetes_api(config):
    files = _manifests(**config)
    docs = _all_docs(files)
    assert docs
    for doc in docs:
        validate(doc)
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds.count("Job") == 2
    assert "Secret" in kinds


def test_the_schema_check_rejects_broken_documents():
    files = _manifests()
    job = _job(files, "workers.yaml")
    validate(job)  # the intact document passes

    no_template = copy.deepcopy(job)
    del no_template["spec"]["template"]
    with pytest.raises(ValueError, match="template"):
        validate(no_template)

    no_name = copy.deepcopy(job)
    del no_name["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        validate(no_name)

    typo = copy.deepcopy(job)
    container = typo["spec"]["template"]["spec"]["containers"][0]
    container["volumeMount"] = container.pop("volumeMounts")
    with pytest.raises(SchemaError, match="volumeMount"):
        validate(typo)

    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["parallelism"] = "3"
    with pytest.raises(ValueError, match="parallelism"):
        validate(wrong_type)

    int_quantity = copy.deepcopy(job)
    int_quantity["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 2
    with pytest.raises(ValueError):
        validate(int_quantity)

    with pytest.raises(SchemaError, match="unknown"):
        validate({"apiVersion": "batch/v1", "kind": "CronJobb", "metadata": {"name": "x"}})

    (statefulset,) = [d for d in files["database.yaml"] if d["kind"] == "StatefulSet"]
    no_selector = copy.deepcopy(statefulset)
    del no_selector["spec"]["selector"]
    with pytest.raises(ValueError, match="selector"):
        validate(no_selector)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", ["Flowers", "flow_ers", "-flowers", "flowers-", "", "a" * 44])
def test_bad_names_are_config_errors_naming_the_value(bad):
    with pytest.raises(ConfigError, match=re.escape(repr(bad))):
        _manifests(name=bad)


def test_the_longest_name_keeps_every_derived_name_a_dns_label():
    name = "a" * 43
    files = _manifests(name=name)
    for doc in _all_docs(files):
        assert len(doc["metadata"]["name"]) <= 63
    # the Job controller names pods "<job>-xxxxx", StatefulSet revisions "<sts>-<10 chars>"
    assert len(f"{name}-coordinator-xxxxx") <= 63
    assert len(f"{name}-postgres-0123456789") <= 63


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("namespace", "ML_Team"),
        ("data_claim", "Data Claim"),
        ("runs_claim", "runs_"),
        ("storage_class", "Fast SSD"),
    ],
)
def test_other_bad_names_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=re.escape(repr(value))):
        _manifests(**{field: value})


@pytest.mark.parametrize("budget", ["soon", "0", "-5m", "none", "inf"])
def test_budget_must_be_a_finite_duration(budget):
    with pytest.raises(BudgetError, match="budget"):
        _manifests(budget=budget)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"workers": 0}, "--workers"),
        ({"workers": True}, "--workers"),
        ({"gpus": -1}, "--gpus"),
        ({"cpu": "two"}, "--cpu"),
        ({"cpu": "0"}, "--cpu"),
        ({"memory": "8"}, "did you mean"),
        ({"runs_size": "lots"}, "--runs-size"),
        ({"image": "my image"}, "--image"),
        ({"data_path": "data/flowers"}, "/data"),
        ({"data_path": "/srv/flowers"}, "/data"),
        ({"data_path": "/data/../etc"}, "/data"),
        ({"extra_args": ["--storage", "postgresql://x"]}, "--storage"),
        ({"extra_args": ["--workers=4"]}, "--workers"),
        ({"extra_args": "--backbone resnet50"}, "list"),
    ],
)
def test_bad_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _manifests(**overrides)


def test_database_url_is_checked_without_echoing_it():
    with pytest.raises(ConfigError, match="SQLite") as info:
        _manifests(database_url="sqlite:////runs/study.db")
    assert "study.db" not in str(info.value)
    with pytest.raises(ConfigError, match="PostgreSQL") as info:
        _manifests(database_url="redis://:hunter2hunter2@cache:6379")
    assert "hunter2" not in str(info.value)


# --------------------------------------------------------------------------- contents


def test_jobs_run_the_coordinator_and_workers_of_one_study():
    files = _manifests(extra_args=["--backbone", "resnet50"])
    coordinator = _job(files, "coordinator.yaml")
    workers = _job(files, "workers.yaml")
    assert coordinator["metadata"]["name"] == "flowers-coordinator"
    assert workers["metadata"]["name"] == "flowers-workers"
    assert _container(coordinator)["command"] == [
        "visionflow", "train", "/data/flowers", "--name", "flowers", "--out", "/runs",
        "--budget", "1h", "--workers", "1", "--backbone", "resnet50",
    ]  # fmt: skip
    assert _container(workers)["command"] == [
        "visionflow", "worker", "--study", "flowers", "--wait", "900",
    ]  # fmt: skip
    assert workers["spec"]["parallelism"] == workers["spec"]["completions"] == BASE["workers"]
    assert coordinator["spec"]["backoffLimit"] <= 3
    for job in (coordinator, workers):
        assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"


def test_coordinator_and_workers_see_the_same_volumes_at_the_same_paths():
    files = _manifests()
    pods = [
        _job(files, f)["spec"]["template"]["spec"] for f in ("coordinator.yaml", "workers.yaml")
    ]
    assert pods[0]["volumes"] == pods[1]["volumes"]
    assert pods[0]["containers"][0]["volumeMounts"] == pods[1]["containers"][0]["volumeMounts"]
    mounts = {m["mountPath"]: m for m in pods[0]["containers"][0]["volumeMounts"]}
    assert mounts["/data"].get("readOnly") is True
    assert not mounts["/runs"].get("readOnly", False)
    volumes = {v["name"]: v for v in pods[0]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {
        "claimName": "flowers-data",
        "readOnly": True,
    }
    assert volumes["runs"]["persistentVolumeClaim"]["claimName"] == "flowers-runs"


def test_created_claims_are_read_write_many_and_existing_claims_are_used():
    files = _manifests(storage_class="nfs")
    claims = {c["metadata"]["name"]: c["spec"] for c in files["volumes.yaml"]}
    assert set(claims) == {"flowers-data", "flowers-runs"}
    for spec in claims.values():
        assert spec["accessModes"] == ["ReadWriteMany"]
        assert spec["storageClassName"] == "nfs"
    assert claims["flowers-runs"]["resources"]["requests"]["storage"] == "20Gi"

    existing = _manifests(data_claim="imagenet", runs_claim="shared-runs")
    assert "volumes.yaml" not in existing
    volumes = _job(existing, "workers.yaml")["spec"]["template"]["spec"]["volumes"]
    claim_names = {v["persistentVolumeClaim"]["claimName"] for v in volumes if v["name"] != "dshm"}
    assert claim_names == {"imagenet", "shared-runs"}

    only_data = _manifests(data_claim="imagenet")
    assert [c["metadata"]["name"] for c in only_data["volumes.yaml"]] == ["flowers-runs"]


def test_builtin_database_is_a_postgres_statefulset_with_a_generated_password():
    files = _manifests()
    (secret,) = files["secret.yaml"]
    password = secret["stringData"]["POSTGRES_PASSWORD"]
    assert len(password) >= 24
    assert secret["stringData"]["VISIONFLOW_STORAGE"] == (
        f"postgresql://visionflow:{password}@flowers-postgres:5432/visionflow"
    )
    assert _manifests()["secret.yaml"][0]["stringData"]["POSTGRES_PASSWORD"] != password
    kinds = {d["kind"]: d for d in files["database.yaml"]}
    statefulset, service = kinds["StatefulSet"], kinds["Service"]
    assert service["metadata"]["name"] == "flowers-postgres"
    assert statefulset["spec"]["serviceName"] == "flowers-postgres"
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "postgres:16"
    assert container["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "pgdata"
    for job_file in ("coordinator.yaml", "workers.yaml"):
        (init,) = _job(files, job_file)["spec"]["template"]["spec"]["initContainers"]
        assert "pg_isready" in init["command"][-1]
        assert "flowers-postgres" in init["command"][-1]


def test_external_database_has_no_statefulset_and_only_a_secret():
    url = "postgresql://vf:s3cret@db.example.com:5432/studies"
    files = _manifests(database_url=url)
    assert "database.yaml" not in files
    assert not [d for d in _all_docs(files) if d["kind"] in {"StatefulSet", "Service"}]
    (secret,) = files["secret.yaml"]
    assert secret["stringData"] == {"VISIONFLOW_STORAGE": url}
    for job_file in ("coordinator.yaml", "workers.yaml"):
        assert "initContainers" not in _job(files, job_file)["spec"]["template"]["spec"]


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_the_secret_is_referenced_never_inlined(config):
    files = _manifests(**config)
    (secret,) = files["secret.yaml"]
    sensitive = [v for v in secret["stringData"].values()]
    others = [d for d in _all_docs(files) if d["kind"] != "Secret"]
    for value in _walk(others):
        if isinstance(value, str):
            assert not any(s in value for s in sensitive), value
            assert "postgresql://" not in value
    for job_file in ("coordinator.yaml", "workers.yaml"):
        container = _container(_job(files, job_file))
        assert "--storage" not in container["command"]
        env = {e["name"]: e for e in container["env"]}
        assert env["VISIONFLOW_STORAGE"] == {
            "name": "VISIONFLOW_STORAGE",
            "valueFrom": {"secretKeyRef": {"name": "flowers-db", "key": "VISIONFLOW_STORAGE"}},
        }


def test_gpus_are_requested_only_when_asked():
    cpu_only = _manifests()
    assert "nvidia.com/gpu" not in _walk(cpu_only)
    assert all("tolerations" not in spec for spec in _pod_specs(cpu_only))
    for job_file in ("coordinator.yaml", "workers.yaml"):
        resources = _container(_job(cpu_only, job_file))["resources"]
        assert resources["requests"] == {"cpu": "2", "memory": "8Gi"}

    gpu = _manifests(gpus=2)
    for job_file in ("coordinator.yaml", "workers.yaml"):
        job = _job(gpu, job_file)
        assert _container(job)["resources"]["limits"]["nvidia.com/gpu"] == "2"
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in job[
            "spec"
        ]["template"]["spec"]["tolerations"]
    for doc in gpu["database.yaml"] + gpu["files-pod.yaml"]:
        assert "nvidia.com/gpu" not in _walk(doc)


@pytest.mark.parametrize(("cpu", "threads"), [("2", "2"), ("500m", "1"), ("1.5", "2"), ("8", "8")])
def test_torch_threads_follow_the_cpu_request(cpu, threads):
    env = _container(_job(_manifests(cpu=cpu), "workers.yaml"))["env"]
    assert {"name": "OMP_NUM_THREADS", "value": threads} in env


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_pod_runs_as_non_root_without_privilege_escalation(config):
    specs = _pod_specs(_manifests(**config))
    assert len(specs) == (3 if "database_url" in config else 4)
    for spec in specs:
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] > 0
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] is False
        for container in spec["containers"] + spec.get("initContainers", []):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert "privileged" not in container["securityContext"]


def test_namespace_and_labels_on_every_object():
    files = _manifests(namespace="ml-team")
    for doc in _all_docs(files):
        assert doc["metadata"]["namespace"] == "ml-team"
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "flowers"
    assert all("namespace" not in d["metadata"] for d in _all_docs(_manifests()))


# --------------------------------------------------------------------------- files


def test_written_files_parse_and_the_kustomization_lists_them(tmp_path):
    written = write_tune_manifests(tmp_path / "k8s", **BASE, namespace="ml-team")
    names = [p.name for p in written]
    assert names == [
        "secret.yaml", "volumes.yaml", "database.yaml", "coordinator.yaml", "workers.yaml",
        "files-pod.yaml", "kustomization.yaml", "Dockerfile", "README.md",
    ]  # fmt: skip
    for path in written:
        assert path.is_file()
        if path.suffix == ".yaml":
            text = path.read_text()
            assert "&id" not in text and "*id" not in text  # no YAML anchors/aliases
            for doc in yaml.safe_load_all(text):
                if path.name != "kustomization.yaml":
                    validate(doc)
    kustomization = yaml.safe_load((tmp_path / "k8s" / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "ml-team"
    assert kustomization["resources"] == [
        n for n in names if n.endswith(".yaml") and n not in NOT_APPLIED | {"kustomization.yaml"}
    ]
    assert stat.S_IMODE((tmp_path / "k8s" / "secret.yaml").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k8s" / "workers.yaml").stat().st_mode) == 0o644
    readme = (tmp_path / "k8s" / "README.md").read_text()
    assert "ReadWriteMany" in readme and "kubectl apply -k" in readme


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_kustomize_renders_the_folder(tmp_path):
    """``kubectl apply -k`` first renders the folder; this step needs no cluster."""
    write_tune_manifests(tmp_path, **BASE, namespace="ml-team")
    rendered = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = list(yaml.safe_load_all(rendered))
    assert sorted(d["kind"] for d in docs) == [
        "Job", "Job", "PersistentVolumeClaim", "PersistentVolumeClaim", "Secret", "Service",
        "StatefulSet",
    ]  # fmt: skip
    for doc in docs:
        assert doc["metadata"]["namespace"] == "ml-team"
        validate(doc)


def test_regenerating_keeps_the_database_password(tmp_path):
    write_tune_manifests(tmp_path, **BASE)
    first = yaml.safe_load((tmp_path / "secret.yaml").read_text())["stringData"]
    write_tune_manifests(tmp_path, **{**BASE, "workers": 5})
    second = yaml.safe_load((tmp_path / "secret.yaml").read_text())["stringData"]
    assert second == first
    workers = yaml.safe_load((tmp_path / "workers.yaml").read_text())
    assert workers["spec"]["parallelism"] == 5
    # another study in the same folder gets its own password
    write_tune_manifests(tmp_path, **{**BASE, "name": "tulips", "data_path": "/data/tulips"})
    third = yaml.safe_load((tmp_path / "secret.yaml").read_text())["stringData"]
    assert third["POSTGRES_PASSWORD"] != first["POSTGRES_PASSWORD"]


def test_dockerfile_is_written_non_root_and_matches_the_repository_copy(tmp_path):
    written = write_tune_manifests(tmp_path, **BASE)
    dockerfile = next(p for p in written if p.name == "Dockerfile").read_text()
    assert dockerfile == dockerfile_text() == (REPO / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", dockerfile, re.M)
    assert 'pip install ".[weights,postgres]"' in dockerfile
    assert 'ENTRYPOINT ["visionflow"]' in dockerfile
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.M)
    assert users, "the image must switch to a non-root user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes can verify runAsNonRoot
    pod_uid = _job(_manifests(), "workers.yaml")["spec"]["template"]["spec"]["securityContext"]
    assert pod_uid["runAsUser"] == int(uid)


# --------------------------------------------------------------------------- CLI


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Test root: registers the sub-app as the main CLI will."""

    app.add_typer(k8s_app, name="k8s")
    return app


def test_cli_writes_the_manifests_and_prints_the_apply_command(tmp_path):
    out = tmp_path / "manifests"
    result = CliRunner().invoke(
        _app(),
        ["k8s", "tune", "/data/flowers", "--name", "flowers", "--workers", "4", "--gpus", "1",
         "--budget", "2h", "--image", "reg.example.com/vf:1", "--out", str(out),
         "--", "--backbone", "resnet50"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"kubectl apply -k {out}" in result.stdout
    for name in ("secret.yaml", "coordinator.yaml", "workers.yaml", "kustomization.yaml"):
        assert str(out / name) in result.stdout
    workers = yaml.safe_load((out / "workers.yaml").read_text())
    assert workers["spec"]["parallelism"] == 4
    assert workers["spec"]["template"]["spec"]["containers"][0]["image"] == "reg.example.com/vf:1"
    coordinator = yaml.safe_load((out / "coordinator.yaml").read_text())
    command = coordinator["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[-2:] == ["--backbone", "resnet50"]
    assert command[command.index("--budget") + 1] == "2h"


def test_cli_default_out_dir_and_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(_app(), ["k8s", "tune", "/data/x", "--name", "tulips"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k8s" / "tulips" / "kustomization.yaml").is_file()

    bad = runner.invoke(_app(), ["k8s", "tune", "/data/x", "--name", "Tulips_1"])
    assert bad.exit_code == ConfigError.exit_code
    assert "error:" in bad.output and "'Tulips_1'" in bad.output
    assert "Traceback" not in bad.output

    bad_budget = runner.invoke(_app(), ["k8s", "tune", "/data/x", "--name", "t", "--budget", "x"])
    assert bad_budget.exit_code == BudgetError.exit_code

    typo = runner.invoke(_app(), ["k8s", "tune", "/data/x", "--name", "t", "--worker", "3"])
    assert typo.exit_code != 0  # a misspelt option is an error, not a train argument
    assert not (tmp_path / "k8s" / "t").exists()
