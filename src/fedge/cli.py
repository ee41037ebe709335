"""The `fedge` command. Errors print as one line on stderr and exit non-zero."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from fedge import logs
from fedge.errors import FedgeError
from fedge.malloc import pause_gc

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from fedge.app import App
    from fedge.client import Client
    from fedge.config import RunConfig
    from fedge.fleet.server import Aggregator
    from fedge.observe.dashboard import Dashboard
    from fedge.transport.grpc.server import GrpcTransport
    from fedge.transport.mqtt.server import MqttTransport

app = typer.Typer(
    help="fedge: federated learning for Linux edge fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


PIPE_WIDTH = 1000  # a table is only as wide as its cells need: this is no padding


def _keyed_table(key: str, values: list[str], *headers: str) -> Table:
    """A table led by identifiers an operator copies (node, token, run, model, version):
    that column is never wrapped or shortened, even in an 80-column pipe."""
    from rich.table import Column, Table

    width = max([len(key), *(len(v) for v in values)])
    return Table(Column(key, no_wrap=True, min_width=width), *headers)


@functools.cache
def _console(stdout: bool = False) -> Console:
    """Messages go to stderr, tables to stdout; rich loads on first use (a node never
    prints with it). Into a pipe or a file a table row stays one whole line for grep and
    scripts: no terminal width applies there, so nothing is wrapped or shortened."""
    from rich.console import Console

    stream = sys.stdout if stdout else sys.stderr
    return Console(stderr=not stdout, width=None if stream.isatty() else PIPE_WIDTH)


def _escape(text: str) -> str:
    """`text` printed as it is: "[app]" in a message is not rich markup."""
    from rich.markup import escape

    return escape(text)


ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="TOML config of the run.")]
OutOption = Annotated[Path | None, typer.Option("--out", help="Write per-round results (JSON).")]


class Backend(StrEnum):
    inprocess = "inprocess"
    process = "process"
    ray = "ray"


class CertRole(StrEnum):
    node = "node"
    admin = "admin"
    server = "server"


class LogLevel(StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@app.callback()
def _root(
    log_level: Annotated[
        LogLevel, typer.Option(help="What fedge logs to stderr.", case_sensitive=False)
    ] = LogLevel.warning,
) -> None:
    """fedge: federated learning for Linux edge fleets."""
    logging.getLogger().setLevel(log_level.value.upper())


ModelOutOption = Annotated[
    Path | None, typer.Option("--model-out", help="Write the final global model (safetensors).")
]


def _app_of(cfg: RunConfig, *, node: bool = False) -> App:
    """The configured app; with secure aggregation its clients answer SecAgg+ and the
    server runs it (a `node` has no strategy to check)."""
    from fedge.app import load_app

    app = load_app(
        cfg.app.target,
        cfg.base_dir,
        num_clients=cfg.run.num_clients,
        seed=cfg.run.seed,
        **cfg.app.options,
    )
    secure = cfg.secure_aggregation
    if not secure.enabled:
        return app
    from fedge.secure_aggregation import Settings, secured

    settings = Settings(
        neighbours=secure.neighbours,
        threshold=secure.threshold,
        clipping_range=secure.clipping_range,
        bits=secure.bits,
        groups=secure.groups,
    )
    return secured(app, settings, None if node else cfg.build_strategy())


@dataclass(frozen=True)
class _ConfiguredClients:
    """The app's clients, built where a Ray actor runs: on a cluster each actor loads the
    app once (it must be importable there, its data at hand), as a node does."""

    cfg: RunConfig

    def __call__(self) -> Callable[[int], Client]:
        return _app_of(self.cfg).client_fn


@app.command()
def sim(
    config: ConfigOption = Path("fedge.toml"),
    out: OutOption = None,
    model_out: ModelOutOption = None,
    rounds: Annotated[int | None, typer.Option(help="Override run.rounds.")] = None,
    backend: Annotated[
        Backend | None,
        typer.Option(help="Run clients in this process, a process pool or Ray actors."),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="--backend ray: join this Ray cluster ('auto' or HOST:PORT) instead of "
            "starting a local Ray (simulation.ray_address)."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress view.")] = False,
) -> None:
    """Simulate a federation on this machine, with the app named in the config."""
    from fedge.config import load_config
    from fedge.malloc import started
    from fedge.progress import ProgressObserver, history_table
    from fedge.sim import simulate
    from fedge.weights import to_file

    cfg = load_config(config)
    if rounds is not None:
        cfg.run.rounds = rounds
    if backend is not None:
        cfg.simulation.backend = backend.value
    if ray_address is not None:
        cfg.simulation.ray_address = ray_address
    cfg.base_dir = cfg.base_dir.resolve()  # where Ray actors load the app from
    user_app = _app_of(cfg)
    factory = None
    if cfg.simulation.backend == "ray" and cfg.simulation.ray_address is not None:
        factory = _ConfiguredClients(cfg)
    elif cfg.simulation.backend == "ray":  # a local Ray: client_fn, data and all, once
        from fedge.sim_ray import send_by_value

        send_by_value(cfg.app.target.partition(":")[0])
    started()
    with ProgressObserver(cfg.run.rounds, _console(), disable=quiet) as observer:
        history = simulate(
            user_app.client_fn,
            cfg.run.num_clients,
            cfg.run.rounds,
            strategy=cfg.build_strategy(),
            initial_weights=user_app.initial_weights,
            evaluate_fn=user_app.evaluate_fn,
            seed=cfg.run.seed,
            fit_config=cfg.fit,
            evaluate_config=cfg.evaluate,
            backend=cfg.simulation.backend,
            workers=cfg.simulation.workers,
            stragglers=cfg.simulation.stragglers,
            dropouts=cfg.simulation.dropouts,
            max_round_retries=cfg.run.max_round_retries,
            max_examples=cfg.limits.max_examples,
            example_weights=cfg.limits.weights(),
            workflow=user_app.workflow,
            observer=observer,
            compression=cfg.compression,
            task_times=cfg.simulation.task_times,
            speed_spread=cfg.simulation.speed_spread,
            ray_address=cfg.simulation.ray_address,
            client_factory=factory,
        )
    _console(stdout=True).print(history_table(history))
    if out is not None:
        out.write_text(json.dumps(history.to_dict(), indent=2))
    if model_out is not None and history.weights is not None:
        to_file(history.weights, model_out)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="Where to write the ONNX model.")],
    weights: Annotated[
        Path | None,
        typer.Option(
            help="The model: safetensors weights (sim/server --model-out) or a checkpoint."
        ),
    ] = None,
    config: ConfigOption = Path("fedge.toml"),
    store: Annotated[
        str | None, typer.Option(help="Or a version from this model registry (see --version).")
    ] = None,
    version: Annotated[str, typer.Option(help="A version or tag in --store.")] = "latest",
    model: Annotated[
        str | None, typer.Option(help="The model's name in --store (default: [store] model).")
    ] = None,
    release_key: Annotated[
        list[Path] | None,
        typer.Option("--release-key", help="Trusted release public key for --store."),
    ] = None,
) -> None:
    """Write a trained model as ONNX, with its app's architecture (App.onnx_model).

    The file runs in ONNX Runtime without fedge; exporting needs the serve extra."""
    import tempfile

    from fedge.config import load_config
    from fedge.serve.export import export_onnx, read_weights

    if (weights is None) == (store is None):
        raise FedgeError(
            "fedge export needs the model: --weights FILE.safetensors, or --store URL [--version V]"
        )
    cfg = load_config(config, strategy=False)
    with tempfile.TemporaryDirectory(prefix="fedge-export-") as tmp:
        source = str(weights)
        if store is not None:
            from fedge.store import open_registry

            name = model or cfg.store.model
            registry = open_registry(
                store, endpoint=cfg.store.endpoint, region=cfg.store.region,
                profile=cfg.store.profile, credentials_file=cfg.store.credentials_file,
                verify_keys=release_key or (),
            )  # fmt: skip
            weights = Path(tmp) / "model.safetensors"
            manifest = registry.pull(name, version, weights)
            source = f"{store} {name}/{manifest.version}"
        assert weights is not None
        info = export_onnx(_app_of(cfg), read_weights(weights), out, source=source)
    _console().print(
        _escape(
            f"wrote {info.path} ({info.size} bytes, opset {info.opset}, sha256 {info.sha256})\n"
            f"inputs: {', '.join(map(str, info.inputs))}\n"
            f"outputs: {', '.join(map(str, info.outputs))}"
        ),
        highlight=False,
        soft_wrap=True,
    )


ca_app = typer.Typer(help="Project certificate authority (mutual TLS).", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
CertsOption = Annotated[Path, typer.Option("--certs", help="Directory with the CA and certs.")]


@ca_app.command("init")
def ca_init(
    dir: Annotated[Path, typer.Option("--dir", help="Where to create the CA's files.")],
    force: Annotated[bool, typer.Option(help="Replace an existing CA.")] = False,
) -> None:
    """Create a root CA and the issuing CA under it (EC P-256); ca.key may then go offline."""
    from fedge.security import ca_pin, init_ca

    _console().print(f"CA certificate: {init_ca(dir, force=force)}\npin: {ca_pin(dir)}")


@ca_app.command("issue")
def ca_issue(
    dir: Annotated[Path, typer.Option("--dir", help="The CA directory.")],
    name: Annotated[str, typer.Option("--name", help="Identity (certificate name).")],
    role: Annotated[CertRole, typer.Option(help="What the certificate may do.")] = CertRole.node,
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Server host/IP (repeat).")
    ] = None,
    days: Annotated[
        int | None, typer.Option(min=1, help="Lifetime [default: node 30, others 365].")
    ] = None,
) -> None:
    """Issue a certificate signed by the issuing CA."""
    from fedge.security import issue

    cert, key = issue(dir, name, role=role.value, hosts=host or (), days=days)  # type: ignore[arg-type]
    _console().print(f"certificate: {cert}\nkey: {key}")


@ca_app.command("pin")
def ca_pin_command(
    dir: Annotated[Path, typer.Option("--dir", help="A directory holding ca.crt.")],
) -> None:
    """Print the root CA's pin for `fedge node enroll --ca-pin`."""
    from fedge.security import ca_pin

    typer.echo(ca_pin(dir))


ServerOption = Annotated[str, typer.Option("--server", help="Aggregator HOST:PORT.")]
AdminCertsOption = Annotated[
    Path | None, typer.Option("--certs", help="Directory with an admin certificate.")
]
AdminOption = Annotated[str, typer.Option("--name", help="Admin certificate name.")]
InsecureOption = Annotated[bool, typer.Option(help="Plaintext; loopback only.")]


class Transport(StrEnum):
    grpc = "grpc"
    mqtt = "mqtt"


TransportOption = Annotated[
    Transport, typer.Option(help="How nodes reach the server: gRPC, or an MQTT broker.")
]
BrokerOption = Annotated[
    str, typer.Option(help="With --transport mqtt: the broker, mqtts://HOST:PORT.")
]
PrefixOption = Annotated[str, typer.Option(help="With --transport mqtt: the topic prefix.")]
ChunkOption = Annotated[
    int,
    typer.Option(min=1, max=1024, help="With --transport mqtt: payload chunk size in KiB."),
]
MetricsHostOption = Annotated[
    str | None, typer.Option(help="Address /metrics listens on (default 127.0.0.1).")
]


def _broker_needed(transport: Transport, broker: str) -> None:
    if transport == Transport.mqtt and not broker:
        raise FedgeError("--transport mqtt needs --broker mqtts://HOST:PORT")
    if transport == Transport.grpc and broker:
        raise FedgeError("--broker applies to --transport mqtt")


@contextmanager
def _calling(server: str) -> Iterator[None]:
    """A server that cannot be reached, or refuses a call, is a one-line error."""
    import grpc

    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        if code == grpc.StatusCode.UNAVAILABLE:
            raise FedgeError(f"cannot reach the server at {server}: {details}") from None
        name = code.name if code is not None else "error"
        raise FedgeError(f"the server at {server} answered {name}: {details}") from None


@app.command()
def server(
    config: ConfigOption = Path("fedge.toml"),
    address: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "0.0.0.0:9091",
    certs: Annotated[Path | None, typer.Option(help="CA directory with server.crt/key.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Durable state and checkpoints.")] = Path(
        "fedge-state"
    ),
    insecure: InsecureOption = False,
    out: OutOption = None,
    model_out: ModelOutOption = None,
    rounds: Annotated[int | None, typer.Option(help="Override run.rounds.")] = None,
    wait_for: Annotated[int | None, typer.Option(help="Clients needed before a round.")] = None,
    max_upload_mb: Annotated[
        int | None, typer.Option(min=1, help="Override limits.max_upload_mb.")
    ] = None,
    new_run: Annotated[
        bool, typer.Option("--new-run", help="Start a new run; earlier runs are kept.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the latest run as it was.")
    ] = False,
    heartbeat_interval: Annotated[
        float,
        typer.Option(
            min=0.1, help="Seconds between node heartbeats; silent for 3 of them: not selected."
        ),
    ] = 5.0,
    enroll_address: Annotated[
        str,
        typer.Option(help="HOST:PORT where devices enroll with tokens (TLS, no client cert)."),
    ] = "",
    node_cert_days: Annotated[
        int, typer.Option(min=1, help="Lifetime of the node certificates it issues.")
    ] = 30,
    health_address: Annotated[
        str,
        typer.Option(
            help="HOST:PORT for plaintext gRPC health (grpc.health.v1) alone, e.g. for "
            "Kubernetes gRPC probes, which speak no TLS."
        ),
    ] = "",
    tpm_policy: Annotated[
        Path | None,
        typer.Option(
            help="Enroll only devices whose TPM attests PCRs 0-7 with these known-good "
            'values (JSON: {"0": ["<hex>", ...], ...}).'
        ),
    ] = None,
    tpm_ek_ca: Annotated[
        Path | None,
        typer.Option(
            help="With --tpm-policy: PEM CAs of TPM manufacturers; a device's endorsement "
            "key must have a certificate from one of them (no software TPMs)."
        ),
    ] = None,
    transport: TransportOption = Transport.grpc,
    broker: BrokerOption = "",
    mqtt_prefix: PrefixOption = "fedge",
    mqtt_chunk_kb: ChunkOption = 256,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, help="Serve Prometheus /metrics on this port (default: metrics.port)."
        ),
    ] = None,
    metrics_host: MetricsHostOption = None,
    dashboard: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of a read-only web dashboard of the run (HTTPS with --certs; "
            "plaintext only on loopback)."
        ),
    ] = "",
    dashboard_token_file: Annotated[
        Path | None,
        typer.Option(
            help="File with the dashboard's admin token, made if missing "
            "[default: STATE_DIR/dashboard.token]."
        ),
    ] = None,
    dashboard_token: Annotated[
        str,
        typer.Option(
            envvar="FEDGE_DASHBOARD_TOKEN",
            show_default=False,
            help="The dashboard's admin token itself (prefer the environment variable or "
            "--dashboard-token-file: a command line is visible to every user).",
        ),
    ] = "",
) -> None:
    """Run the aggregator for the config's app until the run finishes.

    Started again on the same state directory it resumes the run (after a crash too);
    with a changed config it refuses and names the change, unless --resume or --new-run.
    """
    import asyncio
    import signal

    from fedge.config import load_config
    from fedge.fleet.runs import RunService
    from fedge.fleet.server import Aggregator, ServerSettings
    from fedge.malloc import started
    from fedge.transport.grpc.server import GrpcTransport
    from fedge.weights import to_file

    _broker_needed(transport, broker)
    cfg = load_config(config)
    if rounds is not None:
        cfg.run.rounds = rounds
    if max_upload_mb is not None:
        cfg.limits.max_upload_mb = max_upload_mb
    runs = RunService.open(state_dir, cfg, new_run=new_run, resume=resume)
    aggregator = Aggregator(  # the app is not kept: the initial weights go after round 1
        _app_of(runs.config),
        runs,
        ServerSettings(
            state_dir,
            wait_for=wait_for,
            heartbeat_interval=heartbeat_interval,
            certs=None if insecure else certs,
        ),
    )

    if tpm_policy is not None and not enroll_address:
        raise FedgeError("--tpm-policy applies to enrollment: it needs --enroll-address")
    if tpm_ek_ca is not None and tpm_policy is None:
        raise FedgeError("--tpm-ek-ca applies to TPM attestation: it needs --tpm-policy")
    enrollment = None  # signs enrollments and renewals, with the issuing CA if it is here
    if certs is not None and not insecure and (enroll_address or (certs / "issuing.key").exists()):
        from fedge.fleet.enrollment import Enrollment
        from fedge.security.attestation import EkIssuers, PcrPolicy

        enrollment = Enrollment(
            runs.store,
            certs,
            node_days=node_cert_days,
            revocations=aggregator.revocations,
            tpm_policy=None if tpm_policy is None else PcrPolicy.load(tpm_policy),
            ek_issuers=None if tpm_ek_ca is None else EkIssuers(tpm_ek_ca),
        )
    grpc_transport = GrpcTransport(
        address,
        certs,
        insecure,
        enrollment=enrollment,
        enroll_address=enroll_address,
        health_address=health_address,
    )
    serving: GrpcTransport | MqttTransport = grpc_transport
    if transport == Transport.mqtt:
        from fedge.transport.mqtt.server import MqttTransport

        serving = MqttTransport(
            broker, grpc_transport, prefix=mqtt_prefix, chunk_size=mqtt_chunk_kb << 10
        )

    board = None
    if dashboard:
        board = _dashboard(
            aggregator, dashboard, dashboard_token, dashboard_token_file, state_dir,
            None if insecure else certs,
        )  # fmt: skip
    elif dashboard_token or dashboard_token_file is not None:
        raise FedgeError("--dashboard-token and --dashboard-token-file need --dashboard HOST:PORT")
    port = metrics_port if metrics_port is not None else runs.config.metrics.port
    scraped = None
    if port is not None:
        from fedge.observe.exposition import new_registry, serve_metrics
        from fedge.observe.fleet import FleetMetrics

        registry = new_registry("server")
        FleetMetrics(aggregator, registry)
        scraped = serve_metrics(registry, port, metrics_host or runs.config.metrics.host)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, aggregator.request_stop, f"signal {sig.name}")
        loop.add_signal_handler(signal.SIGHUP, serving.reload_certificates)
        if board is not None:
            await board.start()
        try:
            await aggregator.serve(serving)
        finally:
            if board is not None:
                await board.stop()

    started()
    try:
        asyncio.run(main())
        if aggregator.state == "finished" and out is not None:
            history = runs.history()
            history.ended_early = aggregator.reason
            out.write_text(json.dumps(history.to_dict(), indent=2))
        if aggregator.state == "finished" and model_out is not None:
            weights = runs.latest_weights()
            if weights is not None:
                to_file(weights, model_out)
    finally:
        if scraped is not None:
            scraped.shutdown()
        runs.store.close()


def _dashboard(
    aggregator: Aggregator,
    address: str,
    token: str,
    token_file: Path | None,
    state_dir: Path,
    certs: Path | None,
) -> Dashboard:
    """The server's dashboard (not started yet), with its token from the option, the
    file, or a new one in the state directory; plaintext only on loopback."""
    try:
        from fedge.observe.dashboard import (
            TOKEN_FILE,
            Dashboard,
            check_token,
            load_token,
            parse_address,
        )
    except ImportError as exc:
        raise FedgeError(
            f"--dashboard needs the dashboard extra (pip install 'fedge[dashboard]'): {exc}"
        ) from None
    from fedge.transport.grpc.tls import require_loopback

    parse_address(address)  # a bad address is an error before a token file is made
    if token and token_file is not None:
        raise FedgeError("give the dashboard token once: --dashboard-token or its file")
    if certs is None:
        try:
            require_loopback(address.rpartition(":")[0] + ":0")
        except FedgeError:
            raise FedgeError(
                f"--dashboard {address}: without --certs the dashboard is plaintext HTTP, "
                "allowed only on a loopback address; give --certs to serve it over HTTPS"
            ) from None
    if token:
        token = check_token(token, "--dashboard-token (or FEDGE_DASHBOARD_TOKEN)")
    else:
        token = load_token(token_file or state_dir / TOKEN_FILE)
    return Dashboard(aggregator, address, token, certs)


node_app = typer.Typer(
    help="Run an edge node (`fedge node --server … --cid …`), or enroll a device.",
    invoke_without_command=True,
)
app.add_typer(node_app, name="node")


@node_app.callback()
def node(
    ctx: typer.Context,
    server: Annotated[str | None, typer.Option(help="Aggregator HOST:PORT.")] = None,
    cid: Annotated[int | None, typer.Option(help="This node's data partition (client id).")] = None,
    config: ConfigOption = Path("fedge.toml"),
    certs: Annotated[
        Path | None, typer.Option(help="Directory with ca.crt and NAME.crt/key.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Certificate name (identity).")] = None,
    insecure: InsecureOption = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Models and results in transit [default: $XDG_CACHE_HOME/fedge/NAME]."),
    ] = None,
    label: Annotated[
        list[str] | None, typer.Option("--label", help="KEY=VALUE shown to the operator.")
    ] = None,
    transport: TransportOption = Transport.grpc,
    broker: BrokerOption = "",
    mqtt_prefix: PrefixOption = "fedge",
    mqtt_chunk_kb: ChunkOption = 256,
    serve: Annotated[
        str, typer.Option(help="Also serve the trained model over HTTP on HOST:PORT.")
    ] = "",
    store: Annotated[
        str, typer.Option(envvar="FEDGE_STORE", help="--serve: the registry [default: [store]].")
    ] = "",
    serve_model: Annotated[str, typer.Option(help="--serve: model [default: [store] model].")] = "",
    serve_tag: Annotated[str, typer.Option(help="--serve: the tag followed.")] = "latest",
    release_key: Annotated[
        list[Path] | None,
        typer.Option(help="--serve: trusted release public key (release.pub); repeatable."),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0, max=65535, help="Serve Prometheus /metrics on this port (and on --serve's)."
        ),
    ] = None,
    metrics_host: MetricsHostOption = None,
) -> None:
    """Run an edge node: dial the server (or the broker), train on local data, reconnect
    forever; with --serve, answer inference requests with the newest verified model."""
    if ctx.invoked_subcommand is not None:
        return
    import signal

    from fedge.compression import CompressClient, Throughput
    from fedge.config import load_config
    from fedge.malloc import started
    from fedge.node.link import Link
    from fedge.node.runtime import Node, NodeSettings
    from fedge.security.credentials import validate_name
    from fedge.transport.grpc.link import GrpcLink
    from fedge.transport.grpc.tls import require_loopback

    _broker_needed(transport, broker)
    if transport == Transport.mqtt:
        server = server or broker
        if insecure:
            raise FedgeError("--transport mqtt needs --certs: the broker asks for them")
    if server is None or cid is None:
        raise FedgeError("a node needs --server HOST:PORT (or --broker) and --cid N")
    if insecure:
        require_loopback(server)
    elif certs is None:
        raise FedgeError("--certs is required (or --insecure on loopback)")
    labels = dict(_pair(item) for item in label or [])
    cfg = load_config(config, strategy=False)
    client = _app_of(cfg, node=True).client_fn(cid)  # only the client is kept: not the app's data
    uplink = Throughput()
    if cfg.compression.mode != "none":
        client = CompressClient(client, cfg.compression, uplink=uplink)
    identity = name or f"node-{cid}"
    validate_name(identity)  # before anything uses it as a file or directory name
    link: Link
    if transport == Transport.mqtt:
        from fedge.transport.mqtt.link import MqttLink

        assert certs is not None
        link = MqttLink(broker, identity, certs, prefix=mqtt_prefix, chunk_size=mqtt_chunk_kb << 10)
    else:
        link = GrpcLink(server, identity, certs, insecure)
    registry, observer, scraped = None, None, None
    if metrics_port is not None or serve:  # prometheus-client is loaded only then
        from fedge.observe.exposition import new_registry, serve_metrics
        from fedge.observe.node import NodeMetrics

        registry = new_registry("node")
        observer = NodeMetrics(registry, identity, cid, server)
        if metrics_port is not None:
            scraped = serve_metrics(registry, metrics_port, metrics_host or "127.0.0.1")
    elif metrics_host is not None:
        raise FedgeError("--metrics-host applies to --metrics-port")
    edge = Node(
        client,
        link,
        NodeSettings(cid=cid, name=identity, cache_dir=cache_dir, labels=labels),
        uplink=uplink,
        observer=observer,
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: edge.stop())
    served = _serve_beside(
        edge, cfg, serve, store, serve_model, serve_tag, release_key or [], registry
    )
    started()
    try:
        edge.run()
    finally:
        if served is not None:
            served.stop()
        if scraped is not None:
            scraped.shutdown()
    if edge.stopped_because is not None:
        raise FedgeError(f"node {identity!r} stopped: {edge.stopped_because}")


def _serve_beside(
    edge: Any,
    cfg: RunConfig,
    address: str,
    store: str,
    model: str,
    tag: str,
    keys: list[Path],
    registry: Any = None,
) -> Any:
    """The inference server in a thread of the node: it follows `tag` for this device
    (its name and labels select it in a staged rollout), checks the store at once when
    a task brings a new global model, and the node's heartbeats report what it serves.
    Its /metrics has the node's metrics too (`registry`)."""
    if not address:
        return None
    from fedge.serve.follower import ModelFollower
    from fedge.serve.model import ServedModel
    from fedge.serve.runner import InferenceServer, ServeSettings, open_source

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise FedgeError(f"--serve must look like HOST:PORT, got {address!r}")
    settings = ServeSettings(
        model or cfg.store.model,
        host=host,
        port=int(port),
        store=store or cfg.store.url,
        tag=tag,
        release_keys=keys,
        device=edge.settings.name,
        labels=edge.settings.labels,
        cache_dir=edge.cache.models.parent / "serve",
        endpoint=cfg.store.endpoint,
        region=cfg.store.region,
        profile=cfg.store.profile,
        credentials_file=cfg.store.credentials_file,
    )
    source = open_source(settings)
    assert isinstance(source, ModelFollower)  # a store is followed, never a fixed file

    def report(served: ServedModel) -> None:
        edge.serving = f"{served.name}/{served.version}"

    if source.current is not None:
        report(source.current)
    source.on_swap.append(report)
    edge.on_new_model = source.expect_new
    server = InferenceServer(source, settings, registry=registry)
    server.start()
    return server


@node_app.command("enroll")
def node_enroll(
    server: Annotated[str, typer.Option(help="The server's enrollment HOST:PORT.")],
    token: Annotated[str, typer.Option(help="One-time token from `fedge tokens create`.")],
    ca_pin: Annotated[str, typer.Option(help="sha256:… of the root CA (`fedge ca pin`).")],
    name: Annotated[str, typer.Option(help="This device's name (certificate CN).")],
    certs: Annotated[Path, typer.Option(help="Where to write ca.crt, NAME.crt, NAME.key.")],
    force: Annotated[bool, typer.Option(help="Replace this name's key and certificate.")] = False,
    tpm: Annotated[
        bool, typer.Option(help="Attest this device's TPM and boot state (PCRs 0-7).")
    ] = False,
    tpm_tcti: Annotated[
        str, typer.Option(help="How to reach the TPM (default: $TPM2TOOLS_TCTI, /dev/tpmrm0).")
    ] = "",
) -> None:
    """Get this device's certificate: a key made here, a CSR and the token over TLS
    verified against the pinned root CA."""
    from fedge.transport.grpc.enroll_client import enroll

    with _calling(server):
        cert = enroll(
            server, token, ca_pin, name, certs, force=force, tpm=tpm_tcti if tpm else None
        )
    _console().print(f"enrolled {name!r}: {cert}")


def _pair(item: str, option: str = "--label") -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise FedgeError(f"{option} must look like KEY=VALUE, got {item!r}")
    return key, value


@app.command()
def status(
    server: ServerOption,
    certs: AdminCertsOption = None,
    name: AdminOption = "admin",
    insecure: InsecureOption = False,
) -> None:
    """Show the run, round, connected nodes and last metrics."""

    from fedge.transport.grpc.control_client import fetch_status

    with _calling(server):
        reply = fetch_status(server, certs, name, insecure)
    _console().print(
        f"run {reply.run_id}: {reply.state}, round {reply.round}/{reply.total_rounds}"
        f", results {reply.results_received}/{reply.results_expected}"
    )
    if reply.waiting_for:
        _console().print(
            f"waiting for {reply.waiting_for} clients; missing: {list(reply.missing_cids)}"
        )
    if reply.reason:
        _console().print(f"reason: {_escape(reply.reason)}", soft_wrap=True)
    _console().print("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in reply.metrics.items()))
    table = _keyed_table(
        "node", [n.node_id for n in reply.nodes], "cid", "address", "live", "tasks done",
        "serving",
    )  # fmt: skip
    for n in reply.nodes:
        table.add_row(
            n.node_id,
            str(n.cid),
            n.address,
            "yes" if n.live else "no",
            str(n.tasks_done),
            n.serving or "-",
        )
    _console(stdout=True).print(table)


@app.command()
def stop(
    server: ServerOption,
    certs: AdminCertsOption = None,
    name: AdminOption = "admin",
    insecure: InsecureOption = False,
    reason: Annotated[str, typer.Option(help="Why, for the server's log.")] = "fedge stop",
) -> None:
    """Stop the server's run after its current write (resume it by starting it again)."""
    from fedge.transport.grpc.control_client import Control

    with _calling(server), Control(server, certs, name, insecure) as control:
        _console().print(f"server: {control.stop(reason)}")


@app.command()
def runs(
    state_dir: Annotated[Path, typer.Option(help="The server's state directory.")] = Path(
        "fedge-state"
    ),
) -> None:
    """List the runs a state directory holds."""
    import datetime as dt

    from fedge.state import StateStore

    if not (state_dir / "state.db").exists():
        raise FedgeError(f"{state_dir} holds no fedge state (no state.db)")
    with StateStore(state_dir / "state.db") as store:
        found = store.runs()
    table = _keyed_table(
        "run", [run["run_id"] for run in found], "status", "rounds", "strategy", "started",
        "reason",
    )  # fmt: skip
    for run in found:
        started = dt.datetime.fromtimestamp(run["created_at"]).strftime("%Y-%m-%d %H:%M:%S")
        strategy = run["config"].get("strategy", {})
        table.add_row(
            run["run_id"],
            run["status"],
            f"{run['rounds_done']}/{run['total_rounds']}",
            str(strategy.get("name", strategy) if isinstance(strategy, dict) else strategy),
            started,
            _escape(run["reason"]),
        )
    _console(stdout=True).print(table)


nodes_app = typer.Typer(
    help="The nodes a server knows, and their client ids.", no_args_is_help=True
)
app.add_typer(nodes_app, name="nodes")


@nodes_app.command("list")
def nodes_list(
    server: ServerOption,
    certs: AdminCertsOption = None,
    name: AdminOption = "admin",
    insecure: InsecureOption = False,
) -> None:
    """Every node the server knows: client id, state, certificate expiry, last seen."""

    from fedge.transport.grpc.control_client import Control

    with _calling(server), Control(server, certs, name, insecure) as control:
        found = control.nodes()
    table = _keyed_table(
        "node", [n.node_id for n in found], "cid", "state", "connected", "live",
        "cert expires", "last seen", "tasks done", "labels", "serving",
    )  # fmt: skip
    for n in found:
        table.add_row(
            n.node_id,
            str(n.cid) if n.has_cid else "-",
            n.state,
            "yes" if n.connected else "no",
            "yes" if n.live else "no",
            _when(n.certificate_expires_unix_ms),
            _when(n.last_seen_unix_ms),
            str(n.tasks_done),
            _labels(n.labels),
            n.serving or "-",
        )
    _console(stdout=True).print(table)


@nodes_app.command("show")
def nodes_show(
    node_id: Annotated[str, typer.Argument(help="Node identity (certificate name).")],
    server: ServerOption,
    certs: AdminCertsOption = None,
    name: AdminOption = "admin",
    insecure: InsecureOption = False,
) -> None:
    """One node: its record, labels and every certificate the server issued or revoked."""
    from fedge.transport.grpc.control_client import Control

    with _calling(server), Control(server, certs, name, insecure) as control:
        (n,) = control.nodes(node_id)
    out = _console(stdout=True)
    out.print(f"node {n.node_id}: {n.state}, client id {n.cid if n.has_cid else '-'}")
    out.print(f"address {_escape(n.address) or '-'}, last seen {_when(n.last_seen_unix_ms)}")
    out.print(f"connected {'yes' if n.connected else 'no'}, tasks done {n.tasks_done}")
    out.print(f"labels: {_labels(n.labels)}")
    for c in n.certificates:  # a line each: serials are long, and meant to be copied
        why = f" ({_escape(c.reason)})" if c.reason else ""
        out.print(
            f"certificate {c.serial}: issued {_when(c.issued_unix_ms)}, expires "
            f"{_when(c.expires_unix_ms)}, {c.state}{why}",
            soft_wrap=True,
        )


@nodes_app.command("revoke")
def nodes_revoke(
    node_id: Annotated[
        str, typer.Argument(help="Node identity: every certificate of it is revoked.")
    ] = "",
    serial: Annotated[
        str | None, typer.Option(help="Revoke only this certificate (hexadecimal serial).")
    ] = None,
    reason: Annotated[str, typer.Option(help="Why; the node is told.")] = "",
    server: ServerOption = "",
    certs: AdminCertsOption = None,
    name: AdminOption = "admin",
    insecure: InsecureOption = False,
) -> None:
    """Revoke a node (or one certificate) at once: its calls are cut, later ones refused."""
    from fedge.transport.grpc.control_client import Control

    if not server:
        raise FedgeError("--server is required")
    if not node_id and not serial:
        raise FedgeError("name a node, or give --serial")
    with _calling(server), Control(server, certs, name, insecure) as control:
        reply = control.revoke(node_id, serial or "", reason)
    what = f"certificate {serial}" if serial else "node"
    _console().print(
        f"{what} {reply.node_id or ''} revoked; {reply.calls_cut} call(s) in progress cut"
    )


def _labels(labels: Mapping[str, str]) -> str:
    return _escape(",".join(f"{k}={v}" for k, v in sorted(labels.items())))


def _when(unix_ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(unix_ms / 1000).strftime("%Y-%m-%d %H:%M") if unix_ms else "-"


@nodes_app.command("assign")
def nodes_assign(
    node_id: Annotated[str, typer.Argument(help="Node identity (certificate name).")],
    cid: Annotated[int, typer.Argument(help="Client id to bind to it.")],
    server: ServerOption,
    certs: AdminCertsOption = None,
    name: AdminOption = "admin",
    insecure: InsecureOption = False,
) -> None:
    """Bind a client id to a node (e.g. a replacement device); its holder stops."""
    from fedge.transport.grpc.control_client import Control

    with _calling(server), Control(server, certs, name, insecure) as control:
        previous = control.assign(node_id, cid)
    held = f" (it was bound to {previous!r}, whose session ended)" if previous else ""
    _console().print(f"client id {cid} is bound to {node_id!r}{held}")


AdminFlagOption = Annotated[str, typer.Option("--admin", help="Admin certificate name.")]
tokens_app = typer.Typer(
    help="One-time enrollment tokens for devices (`fedge node enroll`).", no_args_is_help=True
)
app.add_typer(tokens_app, name="tokens")


@tokens_app.command("create")
def tokens_create(
    server: ServerOption,
    name: Annotated[
        str | None, typer.Option("--name", help="The one node name the token is for.")
    ] = None,
    prefix: Annotated[
        str | None, typer.Option(help="Or: tokens for any one name starting with this.")
    ] = None,
    count: Annotated[int, typer.Option(min=1, help="How many tokens (with --prefix).")] = 1,
    ttl: Annotated[str, typer.Option(help="Valid for, e.g. 30m, 24h, 7d.")] = "24h",
    labels: Annotated[
        list[str] | None, typer.Option("--labels", help="KEY=VALUE for the node (repeat).")
    ] = None,
    certs: AdminCertsOption = None,
    admin: AdminFlagOption = "admin",
    insecure: InsecureOption = False,
) -> None:
    """Print one-time tokens (shown once: the server keeps only their hash)."""
    from fedge.proto.fedge.v1 import fleet_pb2 as pb
    from fedge.transport.grpc.control_client import Control

    request = pb.CreateTokensRequest(
        name=name or "",
        prefix=prefix or "",
        count=count,
        ttl_s=_seconds(ttl),
        labels=dict(_pair(item, "--labels") for item in labels or []),
    )
    with _calling(server), Control(server, certs, admin, insecure) as control:
        reply = control.create_tokens(request)
    for token in reply.tokens:
        typer.echo(token)
    where = reply.enroll_address or "ENROLL-HOST:PORT"
    _console().print(
        f"on the device: fedge node enroll --server {where} --token TOKEN "
        f"--ca-pin {reply.ca_pin} --name NAME --certs DIR",
        soft_wrap=True,
    )


@tokens_app.command("list")
def tokens_list(
    server: ServerOption,
    certs: AdminCertsOption = None,
    admin: AdminFlagOption = "admin",
    insecure: InsecureOption = False,
) -> None:
    """Every token: what it is for, its state (unused, used, expired, revoked), expiry."""

    from fedge.transport.grpc.control_client import Control

    with _calling(server), Control(server, certs, admin, insecure) as control:
        found = control.tokens()
    table = _keyed_table(
        "token id", [t.token_id for t in found], "for", "state", "expires", "used by", "labels"
    )
    for t in found:
        table.add_row(
            t.token_id,
            t.name or f"{t.prefix}*",
            t.state,
            _when(t.expires_unix_ms),
            t.used_by,
            _labels(t.labels),
        )
    _console(stdout=True).print(table)


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(help="The token's id (the part before the dot).")],
    server: ServerOption,
    certs: AdminCertsOption = None,
    admin: AdminFlagOption = "admin",
    insecure: InsecureOption = False,
) -> None:
    """Revoke an unused token: no device can enroll with it."""
    from fedge.transport.grpc.control_client import Control

    with _calling(server), Control(server, certs, admin, insecure) as control:
        control.revoke_token(token_id.partition(".")[0])
    _console().print(f"token {token_id.partition('.')[0]} revoked")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> float:
    """'90s', '30m', '24h', '7d' (or plain seconds) as seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "s")
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise FedgeError(f"--ttl must look like 30m, 24h or 7d, got {text!r}") from None
    if value <= 0:
        raise FedgeError(f"--ttl must be positive, got {text!r}")
    return value


broker_app = typer.Typer(help="The MQTT broker (Eclipse Mosquitto).", no_args_is_help=True)
app.add_typer(broker_app, name="broker")


@broker_app.command("config")
def broker_config(
    certs: Annotated[Path, typer.Option(help="PKI directory with ca.crt and NAME.crt/key.")],
    out: Annotated[Path, typer.Option(help="Where to write mosquitto.conf and acl.")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="TLS port to listen on.")] = 8883,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    name: Annotated[str, typer.Option(help="The broker's certificate name.")] = "broker",
    crl: Annotated[
        Path | None, typer.Option(help="A CRL to refuse revoked certificates (the server's).")
    ] = None,
    prefix: PrefixOption = "fedge",
) -> None:
    """Write a mosquitto config: TLS with project certificates only, the certificate's
    name as username and client id, and an ACL keeping each node to its own topics."""
    from fedge.transport.mqtt.broker import write_config

    files = write_config(certs, out, port=port, host=host, name=name, prefix=prefix, crl=crl)
    _console().print(f"wrote {files.config} and {files.acl}; run: mosquitto -c {files.config}")


models_app = typer.Typer(
    help="The model registry: published versions, tags, signatures.", no_args_is_help=True
)
app.add_typer(models_app, name="models")

StoreOption = Annotated[
    str,
    typer.Option(
        "--store", envvar="FEDGE_STORE", help="file:///path or s3://bucket/prefix (FEDGE_STORE)."
    ),
]
EndpointOption = Annotated[
    str, typer.Option(help="S3 endpoint other than AWS (Ceph RGW, MinIO); or AWS_ENDPOINT_URL.")
]
ModelArgument = Annotated[str, typer.Argument(help="The model's name in the registry.")]
RefArgument = Annotated[str, typer.Argument(help="A version, or a tag (latest, best, ...).")]
ReleaseKeyOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--release-key", help="Trusted release public key (the CA's release.pub); repeatable."
    ),
]


def _registry(store: str, endpoint: str = "", keys: list[Path] | None = None) -> Any:
    from fedge.store import open_registry

    return open_registry(store, endpoint=endpoint, verify_keys=keys or ())


@models_app.command("list")
def models_list(
    store: StoreOption,
    model: Annotated[str | None, typer.Option(help="List this model's versions.")] = None,
    endpoint: EndpointOption = "",
    as_json: Annotated[bool, typer.Option("--json", help="Manifests as JSON lines.")] = False,
) -> None:
    """The models in a store, or one model's versions with their tags, newest last."""
    import msgspec

    registry = _registry(store, endpoint)
    if as_json:
        for name in [model] if model else registry.models():
            tags = registry.tags(name)
            for m in registry.versions(name):
                mine = sorted(t for t, v in tags.items() if v == m.version)
                line = msgspec.to_builtins(m) | {"tags": mine}
                sys.stdout.write(json.dumps(line) + "\n")
        return
    if model is None:
        names = registry.models()
        table = _keyed_table("model", names, "versions", "tags")
        for name in names:
            tags = registry.tags(name)
            shown = ", ".join(f"{t}={v}" for t, v in sorted(tags.items()))
            table.add_row(name, str(len(registry.versions(name))), shown)
    else:
        tags_of: dict[str, list[str]] = {}
        for tag, version in registry.tags(model).items():
            tags_of.setdefault(version, []).append(tag)
        versions = registry.versions(model)
        table = _keyed_table(
            "version", [m.version for m in versions], "created", "round", "metrics", "size",
            "signed", "tags",
        )  # fmt: skip
        for m in versions:
            table.add_row(
                m.version,
                _when(int(m.created * 1000)),
                str(m.round),
                ", ".join(f"{k}={v:.4g}" for k, v in sorted(m.metrics.items())),
                f"{m.size / 1e6:.2f} MB",
                "yes" if m.signature else "no",
                ", ".join(sorted(tags_of.get(m.version, []))),
            )
    _console(stdout=True).print(table)


@models_app.command("show")
def models_show(
    model: ModelArgument,
    ref: RefArgument,
    store: StoreOption,
    device: Annotated[str, typer.Option(help="Show what this device gets in a canary.")] = "",
    label: Annotated[
        list[str] | None, typer.Option(help="The device's KEY=VALUE labels; repeatable.")
    ] = None,
    endpoint: EndpointOption = "",
) -> None:
    """One version's manifest (a tag shows the version it points to, for --device)."""
    import msgspec

    manifest = _registry(store, endpoint).resolve(
        model, ref, device=device, labels=dict(_pair(i) for i in label or [])
    )
    _console(stdout=True).print_json(msgspec.json.encode(manifest).decode())


@models_app.command("pull")
def models_pull(
    model: ModelArgument,
    ref: RefArgument,
    store: StoreOption,
    out: Annotated[Path, typer.Option(help="Where to write the model (safetensors).")],
    release_key: ReleaseKeyOption = None,
    endpoint: EndpointOption = "",
) -> None:
    """Download a version, checked (size, SHA-256, and the signature with --release-key)."""
    if not release_key:
        logging.getLogger(__name__).warning(
            "no --release-key: the signature is not checked, only the hash"
        )
    manifest = _registry(store, endpoint, release_key).pull(model, ref, out)
    _console().print(f"{model}/{manifest.version} -> {out} ({manifest.size} bytes)")


@models_app.command("verify")
def models_verify(
    model: ModelArgument,
    ref: RefArgument,
    store: StoreOption,
    release_key: ReleaseKeyOption = None,
    endpoint: EndpointOption = "",
) -> None:
    """Check a version: signed by a trusted release key, and its file whole and unchanged."""
    if not release_key:
        raise typer.BadParameter("give --release-key (the CA's release.pub) to verify with")
    manifest = _registry(store, endpoint, release_key).check(model, ref)
    _console(stdout=True).print(
        f"{model}/{manifest.version}: signature (key {manifest.key_id}) and SHA-256 "
        f"{manifest.sha256} verified"
    )


@models_app.command("tag")
def models_tag(
    model: ModelArgument,
    tag: Annotated[str, typer.Argument(help="The tag to move, e.g. production.")],
    version: Annotated[str, typer.Argument(help="The version it will point to.")],
    store: StoreOption,
    canary_fraction: Annotated[
        float, typer.Option(min=0, max=1, help="Only this share of devices moves (a canary).")
    ] = 0.0,
    canary_label: Annotated[
        list[str] | None,
        typer.Option(help="Only devices with this KEY=VALUE label move; repeatable."),
    ] = None,
    endpoint: EndpointOption = "",
) -> None:
    """Point a tag at a version (serving nodes that follow the tag switch to it). With
    --canary-fraction or --canary-label only those devices move; the same command
    without them then promotes the version to all."""
    labels = dict(_pair(i, "--canary-label") for i in canary_label or [])
    _registry(store, endpoint).tag(
        model, tag, version, by="fedge models tag", fraction=canary_fraction, labels=labels
    )
    staged = (
        f" (canary: {canary_fraction:.0%} of devices {labels or ''})"
        if labels or canary_fraction
        else ""
    )
    _console().print(f"{model}: {tag} -> {version}{staged}")


@models_app.command("rollback")
def models_rollback(
    model: ModelArgument,
    tag: Annotated[str, typer.Argument(help="The tag to move back.")],
    store: StoreOption,
    endpoint: EndpointOption = "",
) -> None:
    """Point a tag back at the version it pointed to before."""
    previous = _registry(store, endpoint).rollback(model, tag, by="fedge models rollback")
    _console().print(f"{model}: {tag} -> {previous}")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="The model's name (in the store and in URLs).")],
    store: Annotated[
        str, typer.Option(envvar="FEDGE_STORE", help="Follow a tag in this registry.")
    ] = "",
    tag: Annotated[str, typer.Option(help="The tag to follow (latest, best, production).")] = (
        "latest"
    ),
    release_key: ReleaseKeyOption = None,
    onnx: Annotated[
        Path | None, typer.Option(help="Serve this ONNX file instead of a store's model.")
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    device: Annotated[
        str, typer.Option(help="This device's name in staged rollouts [default: hostname].")
    ] = "",
    label: Annotated[
        list[str] | None, typer.Option(help="The device's KEY=VALUE labels; repeatable.")
    ] = None,
    poll: Annotated[float, typer.Option(help="Seconds between checks of the store.")] = 30.0,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Verified models kept here [default: $XDG_CACHE_HOME/fedge/serve]."),
    ] = None,
    max_body_mb: Annotated[float, typer.Option(help="Largest request body, MiB.")] = 32.0,
    threads: Annotated[int, typer.Option(help="ONNX Runtime threads (0: one per core).")] = 0,
    endpoint: EndpointOption = "",
) -> None:
    """Serve a model over HTTP (KServe v2 and v1 predict, /metrics), hot-swapping to each
    new verified version its tag names."""
    import socket

    from fedge.serve.runner import InferenceServer, ServeSettings, open_source

    settings = ServeSettings(
        model,
        host=host,
        port=port,
        store=store,
        tag=tag,
        release_keys=release_key or [],
        onnx=onnx,
        device=device or socket.gethostname(),
        labels=dict(_pair(item) for item in label or []),
        poll=poll,
        cache_dir=cache_dir,
        endpoint=endpoint,
        max_body=int(max_body_mb * (1 << 20)),
        threads=threads,
    )
    InferenceServer(open_source(settings), settings).run()


@app.command()
def demo(
    clients: Annotated[int, typer.Option(help="Number of node processes.")] = 10,
    rounds: Annotated[int, typer.Option(help="Rounds to train.")] = 5,
    config: ConfigOption = Path("examples/digits/fedge.toml"),
    out: OutOption = None,
    transport: TransportOption = Transport.grpc,
) -> None:
    """A real fleet on this machine: CA, server and N nodes over mutual TLS (through a
    mosquitto broker of its own with --transport mqtt)."""
    from fedge.demo import run_demo
    from fedge.malloc import started

    started()
    history = run_demo(config, clients, rounds, _console(), transport.value)
    if history is not None:
        from fedge.progress import history_table

        _console(stdout=True).print(history_table(history))
        if out is not None:
            out.write_text(json.dumps(history.to_dict(), indent=2))


def main() -> None:
    """The command; the cyclic collector stays off until a long-running command
    (server, node, sim, demo) has started (`fedge.malloc.started`)."""
    pause_gc()
    logs.setup(logging.WARNING)
    try:
        app()
    except FedgeError as exc:
        # soft_wrap: one line
        _console().print(f"[red]error:[/red] {_escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
