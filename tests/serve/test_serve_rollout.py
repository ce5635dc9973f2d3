"""Rollouts on a live server: sticky A/B splits, canaries that roll back, shadow traffic,
promote/rollback through the registry, admin-only access, policy validation, the CLI."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import COLOURS, image_bytes, live
from typer.testing import CliRunner

from visionflow.errors import ConfigError
from visionflow.serve import ModelSource, RegistrySource, ServeSettings, create_app
from visionflow.serve.rollout import RolloutPolicy, bucket
from visionflow.serve.runtime import ModelEntry, VersionInfo
from visionflow.serve.security import ApiKey, KeyStore

RED = base64.b64encode(image_bytes(COLOURS["red"])).decode()
BLUE = base64.b64encode(image_bytes(COLOURS["blue"])).decode()
ADMIN, USER = "vf_admin_key_for_tests", "vf_predict_key_for_tests"
KEYS = KeyStore(
    [
        ApiKey("admin", hashlib.sha256(ADMIN.encode()).digest()),
        ApiKey("predict", hashlib.sha256(USER.encode()).digest()),
    ]
)
AS_ADMIN = {"authorization": f"Bearer {ADMIN}"}
AS_USER = {"authorization": f"Bearer {USER}"}


class FakeModel:
    """``red`` when the red channel dominates; ``broken``: every batch fails; ``delay``: slow;
    ``constant``: always that class."""

    def __init__(self, *, delay=0.0, broken=False, constant=None, gate=None) -> None:
        self.classes = ["blue", "red"]
        self.meta = {"classes": self.classes}
        self.delay, self.broken, self.constant, self.gate = delay, broken, constant, gate
        self.warm = False
        self.calls = 0

    def pixels(self, images):
        return np.stack([np.asarray(im.convert("RGB").resize((4, 4))) for im in images])

    def run(self, pixels):
        if not self.warm:  # the warm-up batch passes whatever the model is
            self.warm = True
            return np.zeros((len(pixels), 2), np.float32), np.zeros((len(pixels), 2), np.float32)
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        time.sleep(self.delay)
        if self.broken:
            raise RuntimeError("candidate is broken")
        p = pixels.astype(np.float32)
        logits = np.stack([p[..., 2].mean((1, 2)), p[..., 0].mean((1, 2))], axis=1) / 20
        if self.constant is not None:
            logits = np.zeros_like(logits)
            logits[:, self.classes.index(self.constant)] = 10
        return logits, np.zeros((len(pixels), 2), np.float32)


class Versions(ModelSource):
    """Model ``m`` in several versions (fake models), ``production`` on version 1."""

    def __init__(self, models, aliases=None) -> None:
        super().__init__()
        self.models = dict(models)
        self.aliases = dict(aliases or {"production": 1})

    def scan(self):
        infos = {
            v: VersionInfo("m", v, tuple(a for a, n in self.aliases.items() if n == v))
            for v in self.models
        }
        return {"m": ModelEntry("m", infos, dict(self.aliases))}

    def load(self, info):
        return self.models[info.version]


def settings(**kw):
    return ServeSettings(max_wait_ms=0.5, threads=8, **kw)


def predict(client, headers=None, image=RED, **kw):
    return client.post("/v1/models/m:predict", json={"images": [image], **kw}, headers=headers)


def put(client, policy, headers=AS_ADMIN):
    return client.put("/v1/admin/models/m/rollout", json=policy, headers=headers)


def status(client):
    r = client.get("/v1/admin/models/m/rollout/status", headers=AS_ADMIN)
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------ split
def test_split_shares_traffic_sticky_per_client(tmp_path):
    source = Versions({1: FakeModel(), 2: FakeModel()})
    app = create_app(settings(state_dir=tmp_path), source=source, keys=KEYS)
    with live(app) as srv:
        c = srv.client
        r = put(c, {"mode": "split", "split": {"1": 70, "production": 0, "2": 30}})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "active" and r.json()["policy"]["split"]["2"] == 30

        def one(i):
            r = predict(c, {**AS_USER, "x-client-id": f"client-{i}"})
            assert r.status_code == 200, r.text
            assert r.headers["x-model-version"] == str(r.json()["version"])
            return f"client-{i}", r.json()["version"]

        with ThreadPoolExecutor(8) as pool:
            served = dict(pool.map(one, range(400)))
        share = sum(v == 2 for v in served.values()) / len(served)
        assert 0.22 < share < 0.38, share
        for client, version in served.items():  # exactly the bucket rule
            assert version == (1 if bucket(client, "m") < 7000 else 2)
        again = {predict(c, {**AS_USER, "x-client-id": "client-7"}).json()["version"]}
        again |= {predict(c, {**AS_USER, "x-client-id": "client-7"}).json()["version"]}
        assert again == {served["client-7"]}  # sticky
        no_key = Counter(predict(c, AS_USER).json()["version"] for _ in range(40))
        assert set(no_key) == {1, 2}  # random without the header
        assert predict(c, AS_USER, version="2").json()["version"] == 2  # the client's choice wins

        st = status(c)
        assert st["mode"] == "split" and st["requests"] == 443
        by_version = {v["version"]: v for v in st["versions"]}
        assert by_version[1]["window"]["latency_p95_ms"] > 0
        assert abs(by_version[2]["share"] - (by_version[2]["requests"] / 443)) < 1e-6
        assert 'visionflow_rollout_traffic_share{model="m",version="2"}' in c.get("/metrics").text

        # a custom sticky header
        r = put(c, {"mode": "split", "split": {"1": 50, "2": 50}, "sticky_header": "X-User"})
        assert r.status_code == 200, r.text
        versions = {predict(c, {**AS_USER, "x-user": "u1"}).json()["version"] for _ in range(5)}
        assert len(versions) == 1

    # kept across a restart (the state folder), atomically written JSON
    kept = json.loads((tmp_path / "rollout.json").read_text())
    assert kept["models"]["m"]["policy"]["sticky_header"] == "x-user"
    again_app = create_app(settings(state_dir=tmp_path), source=Versions({1: FakeModel()}))
    assert again_app.state.rollout.state("m").policy.split == {"1": 50, "2": 50}
    (tmp_path / "rollout.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"rollout\.json"):
        create_app(settings(state_dir=tmp_path), source=Versions({1: FakeModel()}))


def test_changing_the_split_fails_no_request_in_flight():
    source = Versions({1: FakeModel(delay=0.005), 2: FakeModel(delay=0.005)})
    app = create_app(settings(), source=source)
    with live(app) as srv:
        c = srv.client
        stop = threading.Event()
        seen: list[tuple[int, int]] = []

        def hammer(worker):
            i = 0
            while not stop.is_set():
                r = predict(c, {"x-client-id": f"w{worker}-{i}"})
                seen.append((r.status_code, r.json().get("version", 0)))
                i += 1

        splits = [{"1": 100}, {"2": 100}, {"1": 50, "2": 50}, {"1": 10, "2": 90}, {"2": 100}]
        with ThreadPoolExecutor(4) as pool:
            running = [pool.submit(hammer, w) for w in range(4)]
            for i in range(15):
                r = put(c, {"mode": "split", "split": splits[i % len(splits)]})
                assert r.status_code == 200, r.text
                time.sleep(0.03)
            assert put(c, {"mode": "none"}).json()["status"] == "off"
            time.sleep(0.05)
            stop.set()
            for f in running:
                f.result()
        assert len(seen) > 40
        assert {code for code, _ in seen} == {200}
        assert {v for _, v in seen} == {1, 2}
        assert predict(c).json()["version"] == 1  # mode none: production again


# ------------------------------------------------------------------------------ canary
@pytest.mark.parametrize(
    ("candidate", "limits", "why"),
    [
        (FakeModel(broken=True), {"max_error_rate": 0.1}, "error rate"),
        (FakeModel(delay=0.12), {"max_p95_ms": 60}, "p95 latency"),
    ],
    ids=["errors", "slow"],
)
def test_canary_rolls_back_by_itself(tmp_path, candidate, limits, why):
    source = Versions({1: FakeModel(), 2: candidate}, {"production": 1, "candidate": 2})
    app = create_app(settings(state_dir=tmp_path), source=source)
    policy = {"candidate": "candidate", "percent": 50, "min_requests": 4, "window_s": 60}
    with live(app) as srv:
        c = srv.client
        r = put(c, {"mode": "canary", "canary": policy | limits})
        assert r.status_code == 200, r.text
        assert status(c)["canary"]["verdict"] == "pending"
        codes = Counter()
        for i in range(60):
            r = predict(c, {"x-client-id": f"c{i}"})
            codes[(r.status_code, r.headers.get("x-model-version"))] += 1
            if status(c)["status"] == "rolled_back":
                break
        st = status(c)
        assert st["status"] == "rolled_back" and why in st["reason"], st
        assert st["canary"]["verdict"] == "rolled_back" and st["canary"]["candidate_version"] == 2
        assert set(codes) <= {(200, "1"), (200, "2"), (500, None)}
        assert sum(n for (code, v), n in codes.items() if code == 500 or v == "2") >= 4
        after = [predict(c, {"x-client-id": f"after{i}"}) for i in range(20)]
        assert {(r.status_code, r.json()["version"]) for r in after} == {(200, 1)}
        metrics = c.get("/metrics").text
        assert 'visionflow_canary_rollbacks_total{model="m",version="2"} 1.0' in metrics
        # the alias is left where it was; the verdict is on disk
        assert c.get("/v1/models/m").json()["aliases"] == {"candidate": 2, "production": 1}
        srv.until(
            lambda: (
                json.loads((tmp_path / "rollout.json").read_text())["models"]["m"]["status"]
                == "rolled_back"
            )
        )


def test_a_healthy_canary_keeps_its_share():
    source = Versions({1: FakeModel(), 2: FakeModel()})
    app = create_app(settings(), source=source)
    canary = {"candidate": 2, "percent": 30, "min_requests": 3, "max_p95_ms": 2000}
    with live(app) as srv:
        c = srv.client
        assert put(c, {"mode": "canary", "canary": canary}).status_code == 200
        versions = Counter(
            predict(c, {"x-client-id": f"k{i}"}).json()["version"] for i in range(60)
        )
        assert versions[2] >= 5 and versions[1] > versions[2]
        st = status(c)
        assert st["status"] == "active" and st["canary"]["verdict"] == "healthy"


# ------------------------------------------------------------------------------ shadow
def test_shadow_measures_agreement_and_never_answers():
    gate = threading.Event()
    candidate = FakeModel(constant="blue", gate=gate)  # agrees on blue images only
    source = Versions({1: FakeModel(), 2: candidate})
    app = create_app(settings(), source=source)
    with live(app) as srv:
        c = srv.client
        assert put(c, {"mode": "shadow", "shadow": {"candidate": "2"}}).status_code == 200
        started = time.perf_counter()
        answers = [predict(c, image=RED if i % 2 else BLUE) for i in range(20)]
        assert time.perf_counter() - started < 4  # the candidate is held, the clients are not
        assert {(r.status_code, r.json()["version"]) for r in answers} == {(200, 1)}
        labels = [r.json()["predictions"][0]["label"] for r in answers]
        assert labels == ["blue", "red"] * 10  # production's answers, not the candidate's
        gate.set()
        srv.until(lambda: (status(c)["shadow"] or {}).get("compared_images") == 20)
        shadow = status(c)["shadow"]
        assert shadow["agreement"] == 0.5 and shadow["dropped"] == 0 and shadow["failed"] == 0
        assert shadow["latency_p95_ms"] > 0
        metrics = c.get("/metrics").text
        assert 'visionflow_shadow_agreement{model="m",version="2"} 0.5' in metrics
        assert predict(c, version="2").json()["predictions"][0]["label"] == "blue"


# ------------------------------------------------------------------------------ registry
class FakeRegistrySource(RegistrySource):
    """A real registry (fake bundles in it); versions load as fake models."""

    def load(self, info):
        return FakeModel()


def test_promote_and_rollback_move_the_registry_alias(tmp_path):
    from visionflow.export.bundle import write_bundle
    from visionflow.registry.store import Registry

    registry = Registry.open(tmp_path / "reg")
    for i in (1, 2):
        bundle = write_bundle(tmp_path / f"b{i}", {"model.onnx": b"fake %d" % i}, {"name": "m"})
        registry.add(bundle, name="m", aliases=["production"] if i == 1 else ["candidate"])
    source = FakeRegistrySource(tmp_path / "reg")
    app = create_app(settings(poll_s=60), source=source, keys=KEYS)
    with live(app) as srv:
        c = srv.client
        canary = {"candidate": "candidate", "percent": 10}
        assert put(c, {"mode": "canary", "canary": canary}).status_code == 200
        r = c.post("/v1/admin/models/m:promote", json={"version": 2}, headers=AS_ADMIN)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["version"], body["previous"]) == (2, 1)
        assert body["rollout"]["status"] == "promoted"  # the canary has done its job
        assert predict(c, AS_USER).json()["version"] == 2  # at once, not at the next poll
        assert registry.get("m").version == 2

        r = c.post("/v1/admin/models/m:rollback", headers=AS_ADMIN)
        assert r.status_code == 200 and (r.json()["version"], r.json()["previous"]) == (1, 2)
        assert predict(c, AS_USER).json()["version"] == 1
        r = c.post("/v1/admin/models/m:rollback", headers=AS_ADMIN)
        assert r.status_code == 409 and "no earlier version" in r.json()["error"]["message"]
        r = c.post("/v1/admin/models/m:promote", json={"version": 9}, headers=AS_ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "registry_refused"
        # non-admin keys
        assert c.post("/v1/admin/models/m:promote", json={"version": 2}).status_code == 401
        r = c.post("/v1/admin/models/m:promote", json={"version": 2}, headers=AS_USER)
        assert r.status_code == 403
        assert c.post("/v1/admin/models/m:rollback", headers=AS_USER).status_code == 403


# ------------------------------------------------------------------------------ access, validation
def test_admin_only_and_bad_policies_name_the_field():
    source = Versions({1: FakeModel(), 2: FakeModel()})
    app = create_app(settings(), source=source, keys=KEYS)
    good = {"mode": "split", "split": {"1": 90, "2": 10}}
    with live(app) as srv:
        c = srv.client
        for method, path in [
            ("GET", "/v1/admin/models/m/rollout"),
            ("PUT", "/v1/admin/models/m/rollout"),
            ("GET", "/v1/admin/models/m/rollout/status"),
            ("POST", "/v1/admin/models/m:rollback"),
        ]:
            assert c.request(method, path, json=good).status_code == 401
            assert c.request(method, path, json=good, headers=AS_USER).status_code == 403
        assert put(c, good).status_code == 200

        def error(policy):
            r = put(c, policy)
            assert r.status_code == 422, r.text
            return r.json()["error"]["message"]

        assert "split" in error({"mode": "split", "split": {"1": 60, "2": 30}})
        assert "sum to 90" in error({"mode": "split", "split": {"1": 60, "2": 30}})
        assert "split.7" in error({"mode": "split", "split": {"1": 50, "7": 50}})
        assert "split: required" in error({"mode": "split"})
        assert "mode" in error({"mode": "blue-green"})
        assert "canary.percent" in error(
            {"mode": "canary", "canary": {"candidate": 2, "percent": 0}}
        )
        assert "canary.candidate" in error({"mode": "canary", "canary": {"candidate": 1}})
        assert "shadow.candidate" in error({"mode": "shadow", "shadow": {"candidate": "beta"}})
        assert "sticky_header" in error(good | {"sticky_header": "bad header"})
        assert "colour" in error(good | {"colour": "blue"})
        assert c.get("/v1/admin/models/m/rollout", headers=AS_ADMIN).json()["policy"] == {
            **RolloutPolicy.model_validate(good).model_dump(mode="json")
        }  # refused policies changed nothing
        assert put(c, {"mode": "none"}, headers=AS_ADMIN).json()["status"] == "off"
        assert c.get("/v1/admin/models/nope/rollout", headers=AS_ADMIN).status_code == 404
        for action, body in (("promote", {"version": 2}), ("rollback", None)):
            r = c.post(f"/v1/admin/models/m:{action}", json=body, headers=AS_ADMIN)
            assert r.status_code == 409 and r.json()["error"]["code"] == "no_registry"


# ------------------------------------------------------------------------------ CLI
def test_rollout_cli_over_http(monkeypatch):
    from visionflow.cli import app as cli

    source = Versions({1: FakeModel(), 2: FakeModel()})
    app = create_app(settings(), source=source, keys=KEYS)
    runner = CliRunner()
    with live(app) as srv:
        monkeypatch.setenv("VISIONFLOW_API_KEY", ADMIN)

        def run(*args, code=0):
            result = runner.invoke(cli, ["rollout", *args, "--url", srv.url])
            assert result.exit_code == code, result.output
            return result.output

        out = run("split", "m", "1=90", "2=10", "--sticky-header", "x-user", "--json")
        assert json.loads(out)["policy"]["split"] == {"1": 90.0, "2": 10.0}
        assert "split" in run("show", "m")
        out = run("canary", "m", "--candidate", "2", "--percent", "5", "--max-p95-ms", "200")
        assert "canary" in out
        canary = srv.client.get("/v1/admin/models/m/rollout", headers=AS_ADMIN).json()["policy"]
        assert canary["canary"]["max_p95_ms"] == 200 and canary["canary"]["percent"] == 5
        assert "shadow" in run("shadow", "m", "--candidate", "2")
        assert "off" in run("off", "m")
        assert "sum to 80" in run("split", "m", "1=70", "2=10", code=2)
        assert "no_registry" in run("promote", "m", "2", code=10)
        assert "no_registry" in run("rollback", "m", code=10)
        monkeypatch.setenv("VISIONFLOW_API_KEY", USER)
        assert "403" in run("show", "m", code=10)
        assert "split" in run("split", "m", "1=x", code=2)


def test_shadow_copies_are_dropped_when_the_candidate_lags():
    from visionflow.serve.metrics import ServeMetrics
    from visionflow.serve.rollout import RolloutManager
    from visionflow.serve.runtime import PredictionEvent

    gate = threading.Event()
    source = Versions({1: FakeModel(), 2: FakeModel(gate=gate)})
    source.bind(settings(), ServeMetrics())
    source.start()
    manager = RolloutManager(shadow_queue=2)
    manager.bind(source, ServeMetrics())
    manager.set_policy("m", RolloutPolicy(mode="shadow", shadow={"candidate": "2"}))
    pixels = np.zeros((1, 4, 4, 3), np.uint8)
    event = PredictionEvent(
        model="m", version=1, request_id="r", endpoint="v1.predict", classes=["blue", "red"],
        labels=["blue"], probabilities=np.array([[0.9, 0.1]]), features=np.zeros((1, 2)),
        pixels=pixels, latency_s=0.01, timestamp=time.time(),
    )  # fmt: skip
    try:
        started = time.perf_counter()
        for _ in range(10):
            manager.after_predict(event)
        assert time.perf_counter() - started < 0.5  # never waits for the candidate
        gate.set()
        entry = source.entry("m")
        deadline = time.monotonic() + 10
        while manager.status("m", entry)["shadow"]["compared_images"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        shadow = manager.status("m", entry)["shadow"]
        assert shadow["sent"] + shadow["dropped"] == 10 and shadow["dropped"] >= 7
    finally:
        gate.set()
        manager.stop()
        source.stop()
