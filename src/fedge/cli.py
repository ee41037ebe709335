"""The `fedge` command. Errors print as one line on stderr and exit non-zero."""

from __future__ import annotations

import json
import logging
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedge.errors import FedgeError

app = typer.Typer(
    help="fedge: federated learning for Linux edge fleets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="TOML config of the run.")]
OutOption = Annotated[Path | None, typer.Option("--out", help="Write per-round results (JSON).")]


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


@app.command()
def sim(
    config: ConfigOption = Path("fedge.toml"),
    out: OutOption = None,
    rounds: Annotated[int | None, typer.Option(help="Override run.rounds.")] = None,
    backend: Annotated[str | None, typer.Option(help="inprocess or process.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress view.")] = False,
) -> None:
    """Simulate a federation on this machine, with the app named in the config."""
    from fedge.app import load_app
    from fedge.config import load_config
    from fedge.progress import ProgressObserver, history_table
    from fedge.sim import simulate

    cfg = load_config(config)
    if rounds is not None:
        cfg.run.rounds = rounds
    if backend is not None:
        if backend not in ("inprocess", "process"):  # not a pydantic traceback
            raise FedgeError(f"--backend must be 'inprocess' or 'process', got {backend!r}")
        cfg.simulation = cfg.simulation.model_validate(
            {**cfg.simulation.model_dump(), "backend": backend}
        )
    user_app = load_app(
        cfg.app.target,
        cfg.base_dir,
        num_clients=cfg.run.num_clients,
        seed=cfg.run.seed,
        **cfg.app.options,
    )
    with ProgressObserver(cfg.run.rounds, console, disable=quiet) as observer:
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
            observer=observer,
        )
    Console().print(history_table(history))
    if out is not None:
        out.write_text(json.dumps(history.to_dict(), indent=2))


ca_app = typer.Typer(help="Project certificate authority (mutual TLS).", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
CertsOption = Annotated[Path, typer.Option("--certs", help="Directory with the CA and certs.")]


@ca_app.command("init")
def ca_init(
    dir: Annotated[Path, typer.Option("--dir", help="Where to create ca.crt and ca.key.")],
    force: Annotated[bool, typer.Option(help="Replace an existing CA.")] = False,
) -> None:
    """Create a project CA (EC P-256)."""
    from fedge.security import init_ca

    console.print(f"CA certificate: {init_ca(dir, force=force)}")


@ca_app.command("issue")
def ca_issue(
    dir: Annotated[Path, typer.Option("--dir", help="The CA directory.")],
    name: Annotated[str, typer.Option("--name", help="Identity (certificate name).")],
    server: Annotated[bool, typer.Option("--server", help="A server certificate.")] = False,
    host: Annotated[
        list[str] | None, typer.Option("--host", help="Server host/IP (repeat).")
    ] = None,
) -> None:
    """Issue a node, admin or (--server) server certificate signed by the CA."""
    from fedge.security import issue

    cert, key = issue(dir, name, server=server, hosts=host or ())
    console.print(f"certificate: {cert}\nkey: {key}")


@app.command()
def server(
    config: ConfigOption = Path("fedge.toml"),
    address: Annotated[str, typer.Option(help="HOST:PORT to listen on.")] = "0.0.0.0:9091",
    certs: Annotated[Path | None, typer.Option(help="CA directory with server.crt/key.")] = None,
    state_dir: Annotated[Path, typer.Option(help="Durable state and checkpoints.")] = Path(
        "fedge-state"
    ),
    insecure: Annotated[bool, typer.Option(help="Plaintext; loopback only.")] = False,
    out: OutOption = None,
    rounds: Annotated[int | None, typer.Option(help="Override run.rounds.")] = None,
    wait_for: Annotated[int | None, typer.Option(help="Nodes needed before a round.")] = None,
    max_upload_mb: Annotated[
        int, typer.Option(min=1, help="Largest result a node may upload, in MiB.")
    ] = 2048,
) -> None:
    """Run the aggregator for the config's app until the run finishes."""
    import asyncio
    import signal

    from fedge.app import load_app
    from fedge.config import load_config
    from fedge.transport.grpc.server import AggregatorServer, ServerSettings, run_id_for

    cfg = load_config(config)
    if rounds is not None:
        cfg.run.rounds = rounds
    strategy = cfg.build_strategy()
    if wait_for is not None:
        strategy.min_available_clients = wait_for
    settings = ServerSettings(
        address=address,
        state_dir=state_dir,
        certs=certs,
        insecure=insecure,
        max_upload_bytes=max_upload_mb << 20,
        round_timeout=cfg.run.round_timeout or 600.0,
    )
    aggregator = AggregatorServer(  # the app is not kept: the initial weights go after round 1
        load_app(
            cfg.app.target,
            cfg.base_dir,
            num_clients=cfg.run.num_clients,
            seed=cfg.run.seed,
            **cfg.app.options,
        ),
        strategy,
        settings,
        rounds=cfg.run.rounds,
        seed=cfg.run.seed,
        fit_config=cfg.fit,
        evaluate_config=cfg.evaluate,
        max_round_retries=cfg.run.max_round_retries,
        run_id=run_id_for(config.read_text() + f"rounds={cfg.run.rounds}"),
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, aggregator.request_stop)
        history = await aggregator.serve()
        if history is not None and out is not None:
            out.write_text(json.dumps(history.to_dict(), indent=2))

    asyncio.run(main())


@app.command()
def node(
    server: Annotated[str, typer.Option(help="Aggregator HOST:PORT.")],
    cid: Annotated[int, typer.Option(help="This node's data partition (client id).")],
    config: ConfigOption = Path("fedge.toml"),
    certs: Annotated[
        Path | None, typer.Option(help="Directory with ca.crt and NAME.crt/key.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Certificate name (identity).")] = None,
    insecure: Annotated[bool, typer.Option(help="Plaintext; loopback only.")] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Models and results in transit [default: $XDG_CACHE_HOME/fedge/NAME]."),
    ] = None,
) -> None:
    """Run an edge node: dial the server, train on local data, reconnect forever."""
    import signal

    from fedge.app import load_app
    from fedge.config import load_config
    from fedge.transport.grpc.node import Node, NodeSettings
    from fedge.transport.grpc.tls import require_loopback

    if insecure:
        require_loopback(server)
    elif certs is None:
        raise FedgeError("--certs is required (or --insecure on loopback)")
    cfg = load_config(config)
    client_fn = load_app(  # only the client is kept: not the app's initial weights
        cfg.app.target,
        cfg.base_dir,
        num_clients=cfg.run.num_clients,
        seed=cfg.run.seed,
        **cfg.app.options,
    ).client_fn
    identity = name or f"node-{cid}"
    edge = Node(
        client_fn(cid),
        NodeSettings(
            server=server,
            cid=cid,
            name=identity,
            certs=certs,
            insecure=insecure,
            cache_dir=cache_dir,
        ),
    )
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: edge.stop())
    edge.run()
    if edge.replaced is not None:
        raise FedgeError(f"node {identity!r} stopped: {edge.replaced}")


@app.command()
def status(
    server: Annotated[str, typer.Option(help="Aggregator HOST:PORT.")],
    certs: Annotated[Path | None, typer.Option(help="Directory with an admin certificate.")] = None,
    name: Annotated[str, typer.Option(help="Admin certificate name.")] = "admin",
    insecure: Annotated[bool, typer.Option(help="Plaintext; loopback only.")] = False,
) -> None:
    """Show the run, round, connected nodes and last metrics."""
    from rich.table import Table

    from fedge.transport.grpc.control import fetch_status

    reply = fetch_status(server, certs, name, insecure)
    console.print(
        f"run {reply.run_id}: {reply.state}, round {reply.round}/{reply.total_rounds}"
        f", results {reply.results_received}/{reply.results_expected}"
    )
    console.print("metrics: " + ", ".join(f"{k}={v:.4f}" for k, v in reply.metrics.items()))
    table = Table("node", "cid", "address")
    for n in reply.nodes:
        table.add_row(n.node_id, str(n.cid), n.address)
    Console().print(table)


@app.command()
def demo(
    clients: Annotated[int, typer.Option(help="Number of node processes.")] = 10,
    rounds: Annotated[int, typer.Option(help="Rounds to train.")] = 5,
    config: ConfigOption = Path("examples/digits/fedge.toml"),
    out: OutOption = None,
) -> None:
    """A real fleet on this machine: CA, server and N nodes over mutual TLS."""
    from fedge.demo import run_demo

    history = run_demo(config, clients, rounds, console)
    if history is not None:
        from fedge.progress import history_table

        Console().print(history_table(history))
        if out is not None:
            out.write_text(json.dumps(history.to_dict(), indent=2))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except FedgeError as exc:
        # escaped: "[app]" in a message is text, not rich markup; soft_wrap: one line
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None
