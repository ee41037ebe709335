"""A server publishes its models to the registry as `[store]` says — signed, pruned,
tagged latest and best, to moto's S3 server and to a real Ceph RGW — and an unreachable
store never stops training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, finished, latest_weights, write_config

from fedge.adapters.numpy import softmax_logits
from fedge.launch import Launcher
from fedge.store import NotFound, open_registry
from fedge.store.cephrgw import CephRGW
from fedge.store.s3server import S3Server
from fedge.weights import read_file

pytestmark = pytest.mark.integration
ort = pytest.importorskip("onnxruntime")


def store_config(tmp_path: Path, url: str, endpoint: str, rounds: int = 4) -> Path:
    return write_config(
        tmp_path / "app",
        rounds=rounds,
        fraction_evaluate=0.0,
        extra=f"""
        [store]
        url = "{url}"
        model = "digits"
        keep = 2
        best_metric = "accuracy"
        endpoint = "{endpoint}"
        """,
    )


@pytest.mark.parametrize("store", ["s3", pytest.param("ceph", marks=pytest.mark.ceph)])
def test_a_run_publishes_signed_models_and_the_cli_reads_them(
    tmp_path: Path, store: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3: S3Server | CephRGW = request.getfixturevalue(store)  # moto, or a real Ceph RGW
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    s3.create_bucket("published")
    url = "s3://published/fleet"
    config = store_config(tmp_path, url, s3.endpoint)
    with Launcher(tmp_path, config, env=s3.env) as fleet:
        out = tmp_path / "history.json"
        server = fleet.server("--wait-for", "4", "--out", out)
        for cid in range(4):
            fleet.node(cid)
        finished(server, fleet)
        final = latest_weights(fleet)
        run_id = next((fleet.state_dir / "runs").iterdir()).name
        pub = fleet.certs / "release.pub"
        rounds = json.loads(out.read_text())["rounds"]

        versions = [f"{run_id}-r{r:06d}" for r in range(1, 5)]
        accuracy = {v: r["metrics"]["accuracy"] for v, r in zip(versions, rounds, strict=True)}
        best = max(versions, key=lambda v: (accuracy[v], v))
        listed = cli(fleet, "models", "list", "--store", url, "--model", "digits",
                     "--endpoint", s3.endpoint, "--json")  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        # the newest two are kept, and the best; every round was published
        registry = open_registry(url, endpoint=s3.endpoint, verify_keys=[pub])
        kept = [m.version for m in registry.versions("digits")]
        assert kept == sorted({*versions[-2:], best}), (kept, accuracy)
        lines = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [line["version"] for line in lines] == kept, listed.stdout
        assert all(line["signature"] for line in lines)
        assert registry.tags("digits") == {"latest": versions[-1], "best": best}
        manifest = registry.resolve("digits", "latest")
        assert (manifest.run, manifest.round, manifest.parent) == (run_id, 4, versions[-2])
        assert manifest.metrics["accuracy"] == accuracy[versions[-1]]

        verified = cli(fleet, "models", "verify", "digits", "latest", "--store", url,
                       "--release-key", pub, "--endpoint", s3.endpoint)  # fmt: skip
        assert verified.returncode == 0 and "verified" in verified.stdout, verified.stderr
        pulled = tmp_path / "pulled.safetensors"
        got = cli(fleet, "models", "pull", "digits", "latest", "--store", url, "--out", pulled,
                  "--release-key", pub, "--endpoint", s3.endpoint)  # fmt: skip
        assert got.returncode == 0, got.stderr
        for name, array in read_file(pulled).items():
            np.testing.assert_array_equal(array, final[name])
        # each version carries its ONNX export, checked like the model
        onnx = tmp_path / "latest.onnx"
        registry.pull("digits", "latest", onnx, artifact="onnx")
        x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
        session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        (logits,) = session.run(["logits"], {"input": x})
        np.testing.assert_allclose(logits, softmax_logits(final, x), atol=1e-5)
        with pytest.raises(NotFound, match="has no 'tflite' file"):
            registry.pull("digits", "latest", onnx, artifact="tflite")
        for args in (("tag", "digits", "production", versions[-2]),
                     ("tag", "digits", "production", versions[-1]),
                     ("rollback", "digits", "production")):  # fmt: skip
            done = cli(fleet, "models", *args, "--store", url, "--endpoint", s3.endpoint)
            assert done.returncode == 0, done.stderr
        assert registry.tags("digits")["production"] == versions[-2]
        refused = cli(fleet, "models", "tag", "digits", "production", "nope", "--store", url,
                      "--endpoint", s3.endpoint)  # fmt: skip
        assert refused.returncode != 0 and "has no version 'nope'" in refused.stderr


def test_an_unreachable_store_does_not_stop_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store is down for the whole run: every round trains, the server says why
    nothing was published and keeps the models; served again once the store is up, the
    finished run publishes them."""
    s3 = S3Server(tmp_path / "moto.log")  # its port is chosen, nothing listens yet
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    url = "s3://late/fleet"
    config = store_config(tmp_path, url, s3.endpoint, rounds=3)
    with Launcher(tmp_path, config, env=s3.env) as fleet:
        out = tmp_path / "history.json"
        server = fleet.server("--wait-for", "4", "--out", out)
        for cid in range(4):
            fleet.node(cid)
        finished(server, fleet)
        log = fleet.log("server", 20000)
        assert [r["status"] for r in json.loads(out.read_text())["rounds"]] == ["ok"] * 3
        assert "could not publish round 000001" in log and "training goes on" in log, log
        assert "not published yet" in log, log
        spool = next((fleet.state_dir / "runs").iterdir()) / "publish"
        assert len(list(spool.glob("*.json"))) == 2  # keep = 2: the newest wait
        with s3:
            s3.create_bucket("late")
            again = fleet.server(name="again")
            finished(again, fleet, "again")
            registry = open_registry(url, endpoint=s3.endpoint)
            rounds = [m.round for m in registry.versions("digits")]
        assert rounds == [2, 3], fleet.log("again")
        assert not list(spool.glob("*.json"))


def test_a_node_serves_the_newest_published_model_and_status_shows_it(tmp_path: Path) -> None:
    """`fedge node --serve`: while the fleet trains, the node's inference server swaps to
    each model the server publishes (told by the node when a task brings a new one), the
    node's heartbeats report it, and `fedge status` shows which version it serves."""
    import httpx

    from fedge.launch import free_port, wait_for

    url = f"file://{tmp_path / 'store'}"
    # enough rounds that the run is still on when `fedge status` (a new process, slow to
    # start on a loaded machine) asks, after node-0 served its second version
    config = write_config(
        tmp_path / "app", rounds=10, fraction_evaluate=0.0, fit_delay=0.4,
        extra=f'[store]\nurl = "{url}"\nmodel = "digits"\nkeep = 12\n',
    )  # fmt: skip
    port = free_port()
    with Launcher(tmp_path, config) as fleet:
        server = fleet.server("--wait-for", "2", "--heartbeat-interval", "0.3")
        serving = fleet.node(
            0, "--serve", f"127.0.0.1:{port}", "--release-key", fleet.certs / "release.pub"
        )
        fleet.node(1)
        seen: set[str] = set()

        def served_by_node_0() -> str | None:
            reply = fleet.status()
            rows = [n for n in reply.nodes if n.node_id == "node-0"] if reply else []
            if rows and rows[0].serving:
                seen.add(rows[0].serving)
            return rows[0].serving if len(seen) >= 2 else None

        wait_for(served_by_node_0, "node-0 serving two versions during the run", 90)
        status = cli(fleet, "status", "--server", fleet.address, "--certs", fleet.certs)
        assert status.returncode == 0, status.stderr
        assert "serving" in status.stdout and "digits/" in status.stdout, status.stdout
        finished(server, fleet)
        registry = open_registry(url, verify_keys=[fleet.certs / "release.pub"])
        latest = registry.resolve("digits", "latest").version
        assert all(s.startswith("digits/") for s in seen), seen
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            # the last model came after the last task: the operator's hook checks at once
            loaded = http.post("/v2/repository/models/digits/load").json()
            assert loaded["version"] == latest and loaded["error"] == "", loaded
            x = np.random.default_rng(0).random((3, 64), dtype=np.float32)
            body = {"inputs": [{"name": "input", "shape": [3, 64], "datatype": "FP32",
                                "data": x.ravel().tolist()}]}  # fmt: skip
            answer = http.post("/v2/models/digits/infer", json=body).json()
            scraped = http.get("/metrics").text  # the node's metrics beside the server's
        assert 'fedge_node_info{cid="0",node="node-0"' in scraped, scraped
        assert 'fedge_node_task_duration_seconds_count{kind="fit",outcome="ok"} 10.0' in scraped
        assert 'fedge_serve_requests_total{code="200",endpoint="infer"} 1.0' in scraped
        assert "process_resident_memory_bytes" in scraped
        logits = np.array(answer["outputs"][0]["data"], np.float32).reshape(3, 10)
        np.testing.assert_allclose(logits, softmax_logits(latest_weights(fleet), x), atol=1e-5)
        assert serving.poll() is None, "the node (and its inference server) keeps running"
