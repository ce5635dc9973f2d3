"""``visionflow k8s serve``: the model server's manifests, checked against the Kubernetes API.

As in test_k8s.py, there is no cluster: every document goes through the official ``kubernetes``
client's models and a walk over their ``attribute_map`` that rejects unknown fields.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from visionflow.deploy.cli import k8s_app
from visionflow.deploy.k8s import (
    REGISTRY_DB_ENV,
    serve_dockerfile_text,
    serve_manifests,
    write_serve_manifests,
)
from visionflow.errors import ConfigError

kubernetes = pytest.importorskip("kubernetes")
from k8s_schema import SchemaError, validator  # noqa: E402

_MODELS = {
    ("v1", "Service"): "V1Service",
    ("v1", "PersistentVolumeClaim"): "V1PersistentVolumeClaim",
    ("apps/v1", "Deployment"): "V1Deployment",
    ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler",
}
validate = validator(_MODELS)


IMAGE = "registry.example.com/visionflow-serve:0.1.0"
CONFIGS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "postgres-keys-namespace": {
        "namespace": "ml-serving",
        "db_secret": "registry-db",
        "api_keys_secret": "serve-keys",
        "registry_claim": "shared-registry",
        "cpu": "500m",
        "memory": "1Gi",
        "port": 9000,
    },
    "storage-class-one-replica": {
        "storage_class": "efs.csi.aws.com",
        "replicas": 1,
        "min_replicas": 1,
        "max_replicas": 1,
        "registry_size": "50Gi",
    },
}


def _manifests(**overrides: Any) -> dict[str, list[dict[str, Any]]]:
    return serve_manifests(**{"image": IMAGE, **overrides})


def _one(files: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (doc,) = [d for docs in files.values() for d in docs if d["kind"] == kind]
    return doc


def _container(files: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (container,) = _one(files, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_every_document_matches_the_kubernetes_api(config):
    files = _manifests(**config)
    docs = [d for ds in files.values() for d in ds]
    for doc in docs:
        validate(doc)
    kinds = sorted(d["kind"] for d in docs)
    expected = ["Deployment", "HorizontalPodAutoscaler", "Service"]
    if "registry_claim" not in config:
        expected.append("PersistentVolumeClaim")
    assert kinds == sorted(expected)


def test_the_schema_check_rejects_broken_documents():
    deployment = _one(_manifests(), "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(SchemaError, match="readinesProbe"):
        validate(typo)
    hpa = _one(_manifests(), "HorizontalPodAutoscaler")
    bad = copy.deepcopy(hpa)
    bad["spec"]["minReplicas"] = "2"
    with pytest.raises(SchemaError, match="minReplicas"):
        validate(bad)


@pytest.mark.parametrize("port", [8080, 9000])
def test_probes_hit_the_health_endpoints_on_the_container_port(port):
    files = _manifests(port=port)
    c = _container(files)
    (container_port,) = c["ports"]
    assert container_port == {"name": "http", "containerPort": port, "protocol": "TCP"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # generous
    assert c["command"] == ["visionflow"]
    args = c["args"]
    assert args[0] == "serve"
    assert args[args.index("--port") + 1] == str(port)
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--registry") + 1] == "/registry"
    service = _one(files, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    deployment = _one(files, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    template = deployment["spec"]["template"]
    assert selector.items() <= template["metadata"]["labels"].items()
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_the_pods_run_non_root_on_a_read_only_root():
    files = _manifests()
    spec = _one(files, "Deployment")["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["automountServiceAccountToken"] is False
    sec = _container(files)["securityContext"]
    assert sec["runAsNonRoot"] is True
    assert sec["readOnlyRootFilesystem"] is True
    assert sec["allowPrivilegeEscalation"] is False
    assert sec["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(files)["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    c = _container(files)
    assert c["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}
    assert c["resources"]["limits"] == {"memory": "2Gi"}


def test_the_registry_is_a_shared_volume():
    files = _manifests()
    (claim,) = files["registry-volume.yaml"]
    assert claim["metadata"]["name"] == "visionflow-serve-registry"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    spec = _one(files, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]

    existing = _manifests(registry_claim="shared-registry")
    assert "registry-volume.yaml" not in existing
    spec = _one(existing, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == "shared-registry"


def test_the_autoscaler_bounds():
    files = _manifests(replicas=3, min_replicas=2, max_replicas=7, target_cpu=55)
    hpa = _one(files, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "visionflow-serve",
    }
    assert hpa["spec"]["minReplicas"] == 2
    assert hpa["spec"]["maxReplicas"] == 7
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"] == {"type": "Utilization", "averageUtilization": 55}
    assert _one(files, "Deployment")["spec"]["replicas"] == 3


def test_the_postgres_secret_reaches_the_server_as_db():
    files = _manifests(db_secret="registry-db", api_keys_secret="serve-keys")
    c = _container(files)
    env = {e["name"]: e for e in c["env"]}
    assert env[REGISTRY_DB_ENV]["valueFrom"]["secretKeyRef"] == {
        "name": "registry-db",
        "key": "url",
    }
    args = c["args"]
    # Kubernetes substitutes $(VAR) in args from the container's env
    assert args[args.index("--db") + 1] == f"$({REGISTRY_DB_ENV})"
    assert args[args.index("--api-keys") + 1] == "/secrets/keys"
    spec = _one(files, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["api-keys"]["secret"]["secretName"] == "serve-keys"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["api-keys"] == {"name": "api-keys", "mountPath": "/secrets", "readOnly": True}

    plain = _container(_manifests())
    assert "--db" not in plain["args"]
    assert "--api-keys" not in plain["args"]
    assert REGISTRY_DB_ENV not in {e["name"] for e in plain["env"]}


def test_the_server_cli_accepts_the_generated_arguments(monkeypatch):
    """The container's args parse with the real `visionflow serve` (stopped before serving)."""
    import typer

    from visionflow.serve import cli as serve_cli

    args = _container(_manifests(db_secret="db", api_keys_secret="keys"))["args"]
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_validate(values):
        seen.update(values)
        raise Stop

    from visionflow.serve.settings import ServeSettings

    monkeypatch.setattr(ServeSettings, "model_validate", staticmethod(fake_validate))
    app = typer.Typer()
    app.command()(serve_cli.serve)
    result = CliRunner().invoke(app, args[1:])
    assert isinstance(result.exception, Stop), result.output
    assert str(seen["registry"]) == "/registry"
    assert seen["db"] == f"$({REGISTRY_DB_ENV})"
    assert seen["host"] == "0.0.0.0"


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"min_replicas": 5, "max_replicas": 3, "replicas": 4}, "--min-replicas"),
        ({"replicas": 20}, "--replicas"),
        ({"max_replicas": 0}, "--max-replicas"),
        ({"name": "Bad_Name"}, "--name"),
        ({"name": "x" * 60}, "--name"),
        ({"namespace": "-ns"}, "--namespace"),
        ({"registry_claim": "Bad Claim"}, "--registry-pvc"),
        ({"db_secret": "UPPER"}, "--db-secret"),
        ({"api_keys_secret": "a/b"}, "--api-keys-secret"),
        ({"target_cpu": 0}, "--target-cpu"),
        ({"cpu": "lots"}, "--cpu"),
        ({"memory": "512"}, "--memory"),
        ({"registry_size": "-1Gi"}, "--registry-size"),
        ({"port": 80}, "--port"),
        ({"image": "has space"}, "--image"),
    ],
)
def test_bad_input_names_the_flag(overrides, flag):
    with pytest.raises(ConfigError, match=re.escape(flag)):
        _manifests(**overrides)


def test_write_serve_manifests(tmp_path):
    out = tmp_path / "serve"
    written = write_serve_manifests(out, image=IMAGE, namespace="ml-serving", db_secret="db")
    names = [p.name for p in written]
    assert names == [
        "registry-volume.yaml",
        "deployment.yaml",
        "service.yaml",
        "hpa.yaml",
        "kustomization.yaml",
        "Dockerfile.serve",
        "README.md",
    ]
    for path in written:
        if path.suffix == ".yaml" and path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                validate(doc)
    assert "PostgreSQL" in (out / "deployment.yaml").read_text().split("apiVersion")[0]
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "ml-serving"
    assert kustomization["resources"] == names[:4]
    readme = (out / "README.md").read_text()
    assert "kubectl apply -k ." in readme
    assert "kubectl rollout status -n ml-serving deployment/visionflow-serve" in readme
    assert "kubectl create secret generic -n ml-serving db" in readme
    assert (out / "Dockerfile.serve").read_text() == serve_dockerfile_text()


def test_the_serving_dockerfile_is_slim_non_root_with_a_healthcheck():
    text = serve_dockerfile_text()
    assert re.search(r"^FROM python:3\.\d+-slim$", text, re.M)
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD .*/healthz", text, re.M)
    assert 'CMD ["serve", "--registry", "/registry"' in text
    # the USER line comes after every install step
    assert text.index("USER 10001") > text.rindex("pip install")


def test_the_cli(tmp_path):
    out = tmp_path / "k8s"
    result = CliRunner().invoke(
        k8s_app,
        ["serve", "--image", IMAGE, "--out", str(out), "--min-replicas", "1", "--replicas", "1"],
    )
    assert result.exit_code == 0, result.output
    assert (out / "deployment.yaml").is_file()
    assert "--db-secret" in result.output  # the warning about SQLite on a shared volume

    bad = CliRunner().invoke(
        k8s_app,
        [
            "serve",
            "--image",
            IMAGE,
            "--out",
            str(out),
            "--min-replicas",
            "5",
            "--max-replicas",
            "2",
        ],
    )
    assert bad.exit_code != 0
    assert "--min-replicas" in bad.output
