"""`fedge serve` as a device runs it: its own process on a port chosen here, following a
tag in a real registry (a directory, or moto's S3 server), answered over real HTTP."""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedge.launch import free_port
from fedge.security import init_ca
from fedge.store import open_registry
from fedge.store.registry import Registry
from fedge.store.s3server import S3Server
from fedge.weights import to_file

pytestmark = pytest.mark.integration
httpx = pytest.importorskip("httpx")
onnx = pytest.importorskip("onnx")

FEDGE = Path(sys.executable).parent / "fedge"
FEATURES, CLASSES = 64, 10


def publish(registry: Registry, tmp: Path, i: int, *, tags: tuple[str, ...] = ()) -> str:
    """Version ``v{i}``: a softmax regression whose logits are its bias, so every answer
    says which version computed it (class i % 10 wins with logit 1 + i)."""
    from fedge.adapters.numpy import softmax_onnx

    bias = np.zeros(CLASSES, np.float32)
    bias[i % CLASSES] = 1 + i
    weights = {"weight": np.zeros((FEATURES, CLASSES), np.float32), "bias": bias}
    to_file(weights, tmp / f"v{i}.safetensors")
    onnx.save(softmax_onnx(weights), tmp / f"v{i}.onnx")
    registry.publish(
        "digits",
        tmp / f"v{i}.safetensors",
        f"v{i}",
        round=i,
        tags=("latest", *tags),
        artifacts={"onnx": tmp / f"v{i}.onnx"},
    )
    return f"v{i}"


def version_of(logits: list[float]) -> str:
    best = int(np.argmax(logits))
    return f"v{round(logits[best]) - 1}"


class Served:
    """One `fedge serve` process and an HTTP client for it."""

    def __init__(self, tmp: Path, *args: str | Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (tmp / f"serve-{self.port}.log").open("wb")
        cmd = [FEDGE, "--log-level", "info", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--cache-dir", tmp / "serve-cache", *args]
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.output()
            try:
                if self.http.get("/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "not ready in 30 s: " + self.output()
            time.sleep(0.05)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")

    def infer(self, rows: int = 2, **extra: object) -> httpx.Response:
        data = np.ones((rows, FEATURES), np.float32).ravel().tolist()
        body = {"inputs": [{"name": "input", "shape": [rows, FEATURES], "datatype": "FP32",
                            "data": data}], **extra}  # fmt: skip
        return self.http.post("/v2/models/digits/infer", json=body)

    def load(self) -> dict[str, object]:
        reply = self.http.post("/v2/repository/models/digits/load")
        assert reply.status_code == 200, reply.text
        return reply.json()

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    init_ca(tmp_path / "pki")
    return tmp_path / "pki"


@pytest.fixture
def registry(tmp_path: Path, pki: Path) -> Registry:
    return open_registry(
        f"file://{tmp_path / 'store'}",
        sign_key=pki / "release.key",
        verify_keys=[pki / "release.pub"],
    )


@pytest.fixture
def served(tmp_path: Path, pki: Path, registry: Registry) -> Iterator[Served]:
    publish(registry, tmp_path, 1, tags=("production",))
    server = Served(
        tmp_path, "--store", f"file://{tmp_path / 'store'}", "--model", "digits",
        "--tag", "production", "--release-key", pki / "release.pub", "--poll", "600",
        "--max-body-mb", "1",
    )  # fmt: skip
    yield server
    server.close()


def test_it_answers_kserve_v2_v1_and_prometheus(served: Served) -> None:
    http = served.http
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2").json()["extensions"] == ["binary_tensor_data", "model_repository"]
    meta = http.get("/v2/models/digits").json()
    assert meta["versions"] == ["v1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "probabilities"]
    assert meta["parameters"]["providers"][-1] == "CPUExecutionProvider"
    assert meta["parameters"]["tag"] == "production" and meta["parameters"]["store_error"] == ""
    assert http.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}

    reply = served.infer(3)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model_name"] == "digits" and body["model_version"] == "v1"
    logits = {o["name"]: o for o in body["outputs"]}["logits"]
    assert logits["shape"] == [3, CLASSES] and logits["datatype"] == "FP32"
    assert version_of(logits["data"][:CLASSES]) == "v1"
    probabilities = np.array(body["outputs"][1]["data"]).reshape(3, CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, rtol=1e-6)

    # the binary tensor extension (what Triton/KServe clients send): JSON header + raw bytes
    x = np.ones((4, FEATURES), np.float32)
    header = (
        b'{"inputs":[{"name":"input","shape":[4,64],"datatype":"FP32",'
        b'"parameters":{"binary_data_size":1024}}],'
        b'"outputs":[{"name":"probabilities","parameters":{"binary_data":true}}]}'
    )
    reply = http.post(
        "/v2/models/digits/infer",
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
    assert reply.status_code == 200, reply.text
    size = int(reply.headers["inference-header-content-length"])
    meta_out = httpx.Response(200, content=reply.content[:size]).json()["outputs"]
    assert [o["name"] for o in meta_out] == ["probabilities"]
    assert meta_out[0]["parameters"]["binary_data_size"] == 4 * CLASSES * 4
    binary = np.frombuffer(reply.content[size:], np.float32).reshape(4, CLASSES)
    np.testing.assert_allclose(binary, probabilities[:1].repeat(4, axis=0), rtol=1e-6)

    # TF Serving / KServe v1
    predicted = http.post("/v1/models/digits:predict", json={"instances": x[:2].tolist()})
    assert predicted.status_code == 200, predicted.text
    rows = predicted.json()["predictions"]
    assert len(rows) == 2 and version_of(rows[0]["logits"]) == "v1"
    assert http.get("/v1/models/digits").json() == {
        "model_version_status": [{"version": "v1", "state": "AVAILABLE"}]
    }
    index = http.post("/v2/repository/index").json()
    assert index == [{"name": "digits", "version": "v1", "state": "READY"}]

    metrics = http.get("/metrics").text
    assert 'fedge_serve_requests_total{code="200",endpoint="infer"} 2.0' in metrics
    assert 'fedge_serve_model_info{model="digits",version="v1"} 1.0' in metrics
    assert "fedge_serve_store_up 1.0" in metrics
    assert 'fedge_build_info{role="serve",version="' in metrics
    assert "process_resident_memory_bytes" in metrics and "process_cpu_seconds_total" in metrics


def test_bad_requests_get_precise_errors_and_the_server_stays_up(served: Served) -> None:
    http = served.http

    def error(reply: httpx.Response, status: int) -> str:
        assert reply.status_code == status, reply.text
        return reply.json()["error"]

    wrong_shape = {"name": "input", "shape": [2, 63], "datatype": "FP32", "data": [0.0] * 126}
    message = error(http.post("/v2/models/digits/infer", json={"inputs": [wrong_shape]}), 400)
    assert "'input' must be FP32 [N, 64], got shape [2, 63]" in message
    wrong_type = {"name": "input", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}
    message = error(http.post("/v2/models/digits/infer", json={"inputs": [wrong_type]}), 400)
    assert "must be FP32 [N, 64], got datatype 'INT64'" in message
    short = {"name": "input", "shape": [2, 64], "datatype": "FP32", "data": [0.0] * 127}
    message = error(http.post("/v2/models/digits/infer", json={"inputs": [short]}), 400)
    assert "shape [2, 64] needs 128 values, got 127" in message
    text = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": ["a"] * 64}
    assert "must hold FP32 [N, 64] numbers" in error(
        http.post("/v2/models/digits/infer", json={"inputs": [text]}), 400
    )
    other = {"name": "image", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}
    assert "no input 'image'; its inputs are 'input' FP32 [N, 64]" in error(
        http.post("/v2/models/digits/infer", json={"inputs": [other]}), 400
    )
    assert "not valid JSON" in error(http.post("/v2/models/digits/infer", content=b"{"), 400)
    assert "$.inputs" in error(http.post("/v2/models/digits/infer", json={"inputs": 3}), 400)
    header = (
        b'{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32",'
        b'"parameters":{"binary_data_size":256}}]}'
    )
    message = error(
        http.post(
            "/v2/models/digits/infer",
            content=header + b"\0" * 100,
            headers={"Inference-Header-Content-Length": str(len(header))},
        ),
        400,
    )
    assert "binary_data_size must be 256 bytes" in message and "100 bytes left" in message
    message = error(
        http.post(
            "/v2/models/digits/infer",
            content=header,
            headers={"Inference-Header-Content-Length": "99999"},
        ),
        400,
    )
    assert "Inference-Header-Content-Length is 99999" in message
    assert 'exactly one of "instances" and "inputs"' in error(
        http.post("/v1/models/digits:predict", json={}), 400
    )
    assert "must be FP32 [N, 64], got shape [3]" in error(
        http.post("/v1/models/digits:predict", json={"instances": [1, 2, 3]}), 400
    )

    # over the body limit (1 MiB here): with a Content-Length, and streamed without one
    big = b"0" * (1 << 20 | 1)
    assert "limit is 1048576" in error(http.post("/v2/models/digits/infer", content=big), 413)
    chunks = iter([big[: 1 << 19], big[1 << 19 :]])
    assert "over the limit" in error(http.post("/v2/models/digits/infer", content=chunks), 413)

    assert "unknown model 'cats': this server serves 'digits'" in error(
        http.post("/v2/models/cats/infer", json={"inputs": [wrong_shape]}), 404
    )
    assert "unknown model 'cats'" in error(http.get("/v2/models/cats"), 404)
    assert "unknown model 'cats'" in error(http.post("/v1/models/cats:predict", json={}), 404)
    assert "use NAME:predict" in error(http.post("/v1/models/digits:classify", json={}), 404)

    assert served.infer().status_code == 200  # and nothing above took it down
    metrics = http.get("/metrics").text
    assert 'fedge_serve_requests_total{code="400",endpoint="infer"} 9.0' in metrics
    assert 'fedge_serve_requests_total{code="413",endpoint="infer"} 2.0' in metrics


def test_ten_hot_swaps_under_load_fail_no_request(
    served: Served, registry: Registry, tmp_path: Path
) -> None:
    """Eight clients keep asking while the tag moves ten times (plus a rollback); every
    answer is a 200 computed entirely by the version it names."""
    stop = threading.Event()
    failures: list[str] = []
    seen: set[str] = set()
    answered = [0]

    def client() -> None:
        with httpx.Client(base_url=served.url, timeout=30) as http:
            body = {"inputs": [{"name": "input", "shape": [1, FEATURES], "datatype": "FP32",
                                "data": [1.0] * FEATURES}]}  # fmt: skip
            while not stop.is_set():
                try:
                    reply = http.post("/v2/models/digits/infer", json=body)
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    continue
                if reply.status_code != 200:
                    failures.append(f"{reply.status_code} {reply.text}")
                    continue
                answer = reply.json()
                computed = version_of(answer["outputs"][0]["data"])
                if computed != answer["model_version"]:
                    failures.append(f"{answer['model_version']} answered as {computed}")
                seen.add(answer["model_version"])
                answered[0] += 1

    clients = [threading.Thread(target=client) for _ in range(8)]
    for thread in clients:
        thread.start()

    def answers(count: int) -> None:
        deadline = time.monotonic() + 30
        while answered[0] < count and not failures:
            assert time.monotonic() < deadline, f"only {answered[0]} answers: {served.output()}"
            time.sleep(0.01)

    try:
        answers(20)
        for i in range(2, 12):
            version = publish(registry, tmp_path, i)
            registry.tag("digits", "production", version)
            before = answered[0]
            assert served.load()["version"] == version
            answers(before + 20)  # requests land on the new version too
        registry.rollback("digits", "production")
        assert served.load()["version"] == "v10"
        time.sleep(0.2)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failures == []
    assert {f"v{i}" for i in range(1, 12)} <= seen
    metrics = served.http.get("/metrics").text
    assert "fedge_serve_model_swaps 12.0" in metrics
    assert len(list((tmp_path / "serve-cache" / "digits").glob("*.onnx"))) == 2  # pruned


def test_only_genuine_versions_are_served(
    served: Served, registry: Registry, tmp_path: Path
) -> None:
    other = tmp_path / "other-ca"
    init_ca(other)
    forger = open_registry(f"file://{tmp_path / 'store'}", sign_key=other / "release.key")
    publish(forger, tmp_path, 2, tags=("production",))
    reply = served.load()
    assert reply["version"] == "v1", "a version signed by a foreign key must not be served"
    assert "digits/v2 is signed by key" in str(reply["error"])
    assert "not a trusted release key" in str(reply["error"])
    meta = served.http.get("/v2/models/digits").json()
    assert "not a trusted release key" in meta["parameters"]["store_error"]
    assert served.http.get("/v2/health/ready").status_code == 200
    assert "fedge_serve_store_up 0.0" in served.http.get("/metrics").text

    # a genuine manifest whose ONNX blob was replaced in the store
    publish(registry, tmp_path, 3, tags=("production",))
    manifest = registry.manifest("digits", "v3")
    blob = tmp_path / "store" / "blobs" / "sha256" / manifest.artifacts["onnx"].sha256
    blob.write_bytes(blob.read_bytes().replace(struct.pack("<f", 4.0), struct.pack("<f", 9.0)))
    reply = served.load()
    assert reply["version"] == "v1" and "tampered" in str(reply["error"])

    publish(registry, tmp_path, 4, tags=("production",))
    assert served.load() == {"name": "digits", "version": "v4", "checked": True, "error": ""}
    assert version_of(served.infer().json()["outputs"][0]["data"]) == "v4"


def test_an_unreachable_store_keeps_the_model_served(
    pki: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with S3Server(tmp_path / "moto.log") as s3:
        for key, value in s3.env.items():
            monkeypatch.setenv(key, value)
        s3.create_bucket("models")
        url = "s3://models/fleet"
        registry = open_registry(
            url, sign_key=pki / "release.key", verify_keys=[pki / "release.pub"]
        )
        publish(registry, tmp_path, 1)
        args = ("--store", url, "--model", "digits",
                "--release-key", pki / "release.pub", "--poll", "600")  # fmt: skip
        served = Served(tmp_path, *args)
    try:  # the S3 server is gone
        reply = served.load()
        assert reply["version"] == "v1" and "Could not connect" in str(reply["error"])
        assert served.http.get("/v2/health/ready").status_code == 200
        assert served.infer().json()["model_version"] == "v1"
        meta = served.http.get("/v2/models/digits").json()
        assert meta["parameters"]["store_error"] == reply["error"]
        assert served.http.post("/v2/repository/index").json()[0]["reason"] == reply["error"]
    finally:
        served.close()
    # restarted while the store is still down: the cached version, checked again
    again = Served(tmp_path, *args)
    try:
        assert again.infer().json()["model_version"] == "v1"
        assert "serving the cached digits/v1" in again.output()
    finally:
        again.close()


def test_a_canary_reaches_only_the_devices_it_selects(
    served: Served, registry: Registry, tmp_path: Path, pki: Path
) -> None:
    """`served` is device "canary-host" with no labels; a second server has site=plant-3."""
    labelled = Served(
        tmp_path, "--store", f"file://{tmp_path / 'store'}", "--model", "digits",
        "--tag", "production", "--release-key", pki / "release.pub", "--poll", "600",
        "--device", "edge-7", "--label", "site=plant-3",
    )  # fmt: skip
    try:
        publish(registry, tmp_path, 2)
        registry.tag("digits", "production", "v2", labels={"site": "plant-3"})
        assert labelled.load()["version"] == "v2"
        assert served.load()["version"] == "v1"
        registry.tag("digits", "production", "v2")  # promoted to every device
        assert served.load()["version"] == "v2"
        registry.rollback("digits", "production")
        assert (served.load()["version"], labelled.load()["version"]) == ("v1", "v1")
    finally:
        labelled.close()
