"""The Ray backend of `fedge.sim`: clients run in a pool of Ray actors, on this machine or
on a Ray cluster.

Each actor builds the clients once — it unpickles `client_fn` from the object store, or
calls a factory that loads the app where the actor runs — and then trains many clients
in turn, as a process-pool worker does. The global model is put in the object store once
per published version; tasks carry only its version and a reference, and an actor reads
it once per version (zero-copy from shared memory on its machine) and gives each client
a private copy, so nothing is pickled into every task.

Tasks go to the actors in batches (one actor call costs ~0.2 ms here, a softmax client's
fit ~1 ms: one call per task would spend a fifth of the time in Ray) and are handed out
as actors free up, so a slow batch does not hold the others. Results are yielded in task
order, so the coordinator folds them in the order of the in-process backend: the same
model, bit for bit.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import ray
from ray.exceptions import RayError

from fedge.client import Client, Config, FitResult, Reply, Result
from fedge.errors import ConfigError
from fedge.weights import Array, Weights

log = logging.getLogger(__name__)

ClientFn = Callable[[int], Client]
ClientFactory = Callable[[], ClientFn]
RayJob = tuple[str, int, str | None, Config, Weights]
"""kind, client id, model version (or None), config, payload."""
Executed = tuple[Result | None, str | None]

MAX_BATCH = 64
"""Tasks per actor call at most: enough to make a call's cost negligible against the
clients' training, few enough that the last batches of a round keep every actor busy."""
RESTARTS = 3
"""Times an actor is restarted after its process died, before its tasks fail for good."""
MODELS_KEPT = 3
"""Model versions an actor keeps (asynchronous rounds still train on older ones)."""


def start(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect this process to Ray, unless it already is (then that session is used as it
    is). `address` None starts a new local Ray with `num_cpus` CPUs (default: this
    machine's); ``HOST:PORT`` joins a running cluster (`ray start --head`), ``"auto"`` the
    one in ``RAY_ADDRESS`` or started on this machine. True if this call connected, so the
    caller must `ray.shutdown()`."""
    if ray.is_initialized():
        return False
    try:
        if address is None:
            ray.init(  # "local": even if RAY_ADDRESS or a `ray start` here names another
                address="local",
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                logging_level=logging.WARNING,
            )
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        if address is None:
            raise ConfigError(f"cannot start a local Ray: {exc}") from exc
        hint = (
            ""
            if os.environ.get("RAY_AUTH_MODE") == "token"
            else " (a cluster with token authentication needs RAY_AUTH_MODE=token here, "
            "and its token in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
        )
        raise ConfigError(
            f"simulation.ray_address: cannot join the Ray cluster at {address!r}: {exc}{hint}"
        ) from exc
    return True


def send_by_value(module: str) -> None:
    """Pickle what `module` (imported here) defines by value when it goes to the actors,
    so that they need not import it: the app module of a local `fedge sim`."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[module])  # type: ignore[no-untyped-call]


class RayPool:
    """`workers` actors (default: one per CPU of the cluster) that run `RayJob` batches."""

    def __init__(
        self,
        client_fn: ClientFn,
        *,
        workers: int | None = None,
        address: str | None = None,
        client_factory: ClientFactory | None = None,
    ) -> None:
        self._owner = start(address, workers)
        self._actors: list[Any] = []
        self._models: dict[str, ray.ObjectRef[Weights]] = {}
        self._shipped: ray.ObjectRef[ClientFn] | None = None  # kept: a restart reads it again
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))  # type: ignore[no-untyped-call]
            count = workers or max(1, cpus)
            if count > cpus:
                raise ConfigError(
                    f"simulation.workers = {count} Ray actors of one CPU each, but the Ray "
                    f"cluster has {cpus} CPUs"
                )
            self._shipped = None if client_factory is not None else _put(client_fn)
            # an actor whose process dies (a client crashed it, out of memory) comes back,
            # its calls then in flight failed; a few times, so a crash loop ends too
            actor = ray.remote(num_cpus=1, max_restarts=RESTARTS)(_Worker)
            self._actors = [actor.remote(self._shipped, client_factory) for _ in range(count)]
            try:  # a worker that cannot build the clients fails here, with its reason
                ray.get([a.ready.remote() for a in self._actors])
            except RayError as exc:
                raise ConfigError(f"the Ray workers could not build the clients: {exc}") from exc
        except BaseException:
            self.close()
            raise
        log.info("ray backend: %d actors on %s", count, ray.get_runtime_context().gcs_address)

    def publish(self, version: str, weights: Weights, keep: Sequence[str]) -> None:
        """Put the model in the object store, once; forget versions not in `keep`."""
        self._models[version] = ray.put(weights)
        for old in [v for v in self._models if v not in keep]:
            del self._models[old]  # its last reference: Ray frees it

    def imap(self, jobs: Sequence[RayJob]) -> Iterator[Executed]:
        """Run `jobs` on the actors, and yield their results in the order of `jobs`."""
        size = max(1, min(MAX_BATCH, math.ceil(len(jobs) / (4 * len(self._actors)))))
        batches = [jobs[i : i + size] for i in range(0, len(jobs), size)]
        window = 4 * len(self._actors)  # batches run or held at once: bounds the memory
        free = deque(a for _ in range(2) for a in self._actors)  # two calls queued each
        running: dict[ray.ObjectRef[list[Executed]], tuple[int, Any]] = {}
        finished: dict[int, list[Executed]] = {}
        submitted = yielded = 0
        while yielded < len(batches):
            while submitted < len(batches) and free and submitted - yielded < window:
                actor = free.popleft()
                ref = actor.run.remote(self._refs(batches[submitted]), batches[submitted])
                running[ref] = (submitted, actor)
                submitted += 1
            if yielded in finished:
                yield from finished.pop(yielded)
                yielded += 1
                continue
            (ref,), _ = ray.wait(list(running), num_returns=1)
            index, actor = running.pop(ref)
            free.append(actor)
            finished[index] = self._results(ref, batches[index])

    def run(self, job: RayJob) -> Executed:
        return next(self.imap([job]))

    def _refs(self, batch: Sequence[RayJob]) -> dict[str, list[ray.ObjectRef[Weights]]]:
        # in a list, so Ray passes the reference itself: the actor reads it once per version
        return {job[2]: [self._models[job[2]]] for job in batch if job[2] is not None}

    @staticmethod
    def _results(ref: ray.ObjectRef[list[Executed]], batch: Sequence[RayJob]) -> list[Executed]:
        try:
            results: list[Executed] = ray.get(ref)
        except RayError as exc:  # the worker died (killed, out of memory, lost node)
            reason = str(exc).strip().splitlines()[0]  # the rest: Ray's advice, pids, ids
            return [(None, f"client {job[1]}: the Ray worker failed: {reason}") for job in batch]
        return [(_writable(result), error) for result, error in results]

    def close(self) -> None:
        """Stop the actors, and Ray itself if `start` started it here (even if killing
        an actor fails: a Ray left running keeps its processes)."""
        actors, self._actors, self._models, self._shipped = self._actors, [], {}, None
        try:
            for actor in actors:
                ray.kill(actor)
        finally:
            if self._owner:
                self._owner = False
                ray.shutdown()


def _put(client_fn: ClientFn) -> ray.ObjectRef[ClientFn]:
    try:
        return ray.put(client_fn)
    except (TypeError, AttributeError, pickle.PicklingError) as exc:
        cause: BaseException = exc  # Ray's message is a page long; the first cause says it
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
        raise ConfigError(
            f"client_fn cannot be sent to the Ray workers: {cause} (give simulate a "
            f"client_factory that builds it where they run; fedge sim does so on a cluster, "
            f"with --ray-address)"
        ) from exc


def _writable(result: Result | None) -> Result | None:
    """Arrays from the object store are read-only views of it; the coordinator gets its
    own, as from the other backends (a strategy may update a result in place)."""
    if isinstance(result, FitResult):
        result.weights = _own(result.weights)
    elif isinstance(result, Reply):
        result.arrays = _own(result.arrays)
    return result


def _own(arrays: Mapping[str, Array]) -> Mapping[str, Array]:
    if all(np.asarray(a).flags.writeable for a in arrays.values()):
        return arrays
    return {name: np.array(a) for name, a in arrays.items()}


class _Worker:
    """One Ray actor: the clients built once, the models it has read, by version."""

    def __init__(self, client_fn: ClientFn | None, factory: ClientFactory | None) -> None:
        built = factory() if factory is not None else client_fn
        assert built is not None
        self.client_fn: ClientFn = built
        self.models: dict[str, Weights] = {}
        torch = sys.modules.get("torch")
        if torch is not None:  # one actor per CPU: one thread each, as in the process pool
            torch.set_num_threads(1)

    def ready(self) -> bool:
        return True

    def run(
        self, models: Mapping[str, list[ray.ObjectRef[Weights]]], batch: Sequence[RayJob]
    ) -> list[Executed]:
        from fedge.sim import _execute, _private_copy

        for version, (ref,) in models.items():
            if version not in self.models:
                self.models[version] = ray.get(ref)
        unused = [v for v in self.models if v not in models]
        for old in unused[: max(0, len(self.models) - MODELS_KEPT)]:
            del self.models[old]
        return [
            _execute(
                *_private_copy((kind, cid, self.models[v] if v else None, config, payload)),
                client_fn=self.client_fn,
            )
            for kind, cid, v, config, payload in batch
        ]
