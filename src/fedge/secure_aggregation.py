"""Secure aggregation (SecAgg+) as a round workflow and a client wrapper.

Four stages of the fleet's own task kinds (`fedge.security.secagg` has the cryptography):

1. ``secagg.keys`` — each sampled client derives two X25519 key pairs for the round and
   sends the public keys.
2. ``secagg.shares`` — each client gets its neighbours' public keys (a random k-regular
   graph), Shamir-shares its self-mask seed and its mask key among them, and sends each
   pair of shares sealed for its neighbour (AES-GCM under their agreed key).
3. ``secagg.masked`` — each client gets the global model and the mask keys of the
   neighbours that shared, trains, quantizes its update delta and sends it masked. The
   server folds each masked vector into a running sum at once: it never holds an
   individual update.
4. ``secagg.unmask`` — each client that sent its input gets the sealed shares addressed
   to it and is told which neighbours sent theirs; it returns its share of each
   survivor's self-mask seed and of each dropped neighbour's mask key (a zero row for
   shares that do not open, which names their sender). The server rebuilds those secrets,
   removes the masks, and has the sum.

Clients weigh equally: an example count would have to travel in the clear or be
trusted unseen. Semi-honest server model, as in Bell et al. and Flower: a server that
lies about who dropped could ask for both secrets of one client from different
neighbours, which a consistency round would prevent; `docs/architecture.md` says this.

A client's secrets for a round derive from a secret it draws when it starts and the
round's label (run, round, attempt), so the wrapper keeps no state between stages and
survives a new client object per task; a process masks and unmasks a label once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedge.app import App
from fedge.client import FIT, Client, ClientWrapper, FitResult, Message, Reply, Result
from fedge.errors import ConfigError
from fedge.security import secagg
from fedge.strategy.base import Strategy, StrategyWrapper
from fedge.strategy.dp import CLIENT_CLIP, DifferentialPrivacy
from fedge.weights import Array, Spec, TensorSpec, Weights

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from fedge.coordinator import Round

log = logging.getLogger(__name__)

KEYS, SHARES, MASKED, UNMASK = "secagg.keys", "secagg.shares", "secagg.masked", "secagg.unmask"
U8, U32 = np.dtype(np.uint8), np.dtype(np.uint32)
NO_PEER = -1
"""Padding in a client's peer list: every list has the graph's degree k."""


@dataclass(frozen=True)
class Settings:
    """What `[secure_aggregation]` configures (see docs/configuration.md)."""

    neighbours: int | None = None
    """k, each client's neighbours in the graph; default: ~2 log2(n), at most n - 1."""
    threshold: float = 0.5
    """Shares needed to rebuild a secret: floor(threshold * k) + 1 (a majority at 0.5)."""
    clipping_range: float = 1.0
    """Each coordinate of an update delta is clipped to [-range, range] before quantizing."""
    bits: int = 16
    """Quantization levels per coordinate: 2^bits (sums live in the ring of 2^32, so a
    group holds at most 2^(32 - bits) - 1 clients)."""
    groups: int = 1
    """Groups that each run SecAgg+; > 1 lets a robust strategy run across group means."""

    def degree(self, n: int) -> int:
        k = secagg.default_neighbours(n) if self.neighbours is None else self.neighbours
        return min(k, n - 1)

    def shares_needed(self, k: int) -> int:
        return int(self.threshold * k) + 1


def check(strategy: Strategy, groups: int = 1) -> None:
    """Refuse strategies that need individual updates (unless there are groups, whose
    means they get instead) or that change how updates are summed (wrappers), but for
    differential privacy with client-side clipping, whose noise goes on the sum."""
    if isinstance(strategy, DifferentialPrivacy) and strategy.clipping == "client":
        if groups > 1:
            raise ConfigError(
                "secure_aggregation: differential privacy noises the sum of all clients; "
                "it cannot run across groups (set groups = 1)"
            )
        strategy = strategy.inner
    if strategy.asynchronous or isinstance(strategy, StrategyWrapper):
        raise ConfigError(
            f"secure_aggregation: cannot run with {strategy.name}: the server sees only sums "
            "of masked updates, which asynchronous strategies and server-side wrappers "
            "cannot work on (for differential privacy set clipping = 'client')"
        )
    if groups == 1 and type(strategy).aggregator is not Strategy.aggregator:
        raise ConfigError(
            f"secure_aggregation: cannot run with {strategy.name}: the server sees only the sum "
            "of the updates, so it works with FedAvg-family strategies (fedavg, fedprox, "
            "fedavgm, fedadam, fedyogi, fedadagrad); for a robust rule set "
            "secure_aggregation.groups > 1, and it runs across the group sums"
        )


def secured(app: App, settings: Settings, strategy: Strategy | None) -> App:
    """The app with every client wrapped to answer the four stages, and the workflow
    (checked against the server's `strategy`)."""
    if strategy is not None:
        check(strategy, settings.groups)
    if app.workflow is not None:
        raise ConfigError(
            "secure_aggregation: the app brings its own workflow; it cannot also run SecAgg+"
        )
    secret = os.urandom(secagg.KEY)  # this process's: a restarted node is a new participant
    inner = app.client_fn
    return dataclasses.replace(
        app,
        client_fn=lambda cid: SecAggClient(inner(cid), cid, secret),
        workflow=SecureRound(settings),
    )


# --- the client side -------------------------------------------------------------------------

PAYLOAD = {
    KEYS: (),
    SHARES: ("peers", "c_pk"),
    MASKED: ("peers", "s_pk"),
    UNMASK: ("peers", "c_pk", "sealed", "survived"),
}
"""The arrays each stage's task brings."""
_done: set[tuple[str, str, bytes]] = set()
"""(stage, label, client secret) this process has answered: each goes out once per label."""
_done_lock = threading.Lock()


class SecAggClient(ClientWrapper):
    """Answers the four SecAgg+ stages for client `cid`; fit and evaluate pass through."""

    def __init__(self, inner: Client, cid: int, secret: bytes) -> None:
        super().__init__(inner)
        self.cid, self._secret = cid, secagg.derive(secret, "client", str(cid))

    def handle(self, message: Message) -> Result:
        stage = {KEYS: self._keys, SHARES: self._shares, MASKED: self._masked, UNMASK: self._unmask}
        if message.kind not in stage:
            return super().handle(message)
        label = str(message.config.get("secagg_label", ""))
        if not label:
            raise secagg.SecAggError(f"a {message.kind} task without its round's secagg_label")
        missing = sorted(set(PAYLOAD[message.kind]) - set(message.payload))
        if missing:
            raise secagg.SecAggError(f"a {message.kind} task without {missing} in its payload")
        _once(message.kind, label, self._secret)
        return stage[message.kind](message, label)

    def _key(self, label: str, purpose: str) -> bytes:
        return secagg.derive(self._secret, label, purpose)

    def _keys(self, message: Message, label: str) -> Reply:
        c_pk = secagg.public_bytes(secagg.private_key(self._key(label, "c")))
        s_pk = secagg.public_bytes(secagg.private_key(self._key(label, "s")))
        return Reply({"c_pk": _u8(c_pk), "s_pk": _u8(s_pk)})

    def _shares(self, message: Message, label: str) -> Reply:
        peers, c_pks = _peers(message.payload, self.cid), message.payload["c_pk"]
        present = [j for j, p in enumerate(peers) if p != NO_PEER]
        needed = int(message.config["secagg_threshold"])
        if len(present) < needed:
            raise secagg.SecAggError(f"only {len(present)} neighbours, the threshold is {needed}")
        b_shares = secagg.split(self._key(label, "b"), needed, len(present))
        s_shares = secagg.split(self._key(label, "s"), needed, len(present))
        c_seed = self._key(label, "c")
        sealed = np.zeros((len(peers), secagg.SEALED), np.uint8)
        for j, b_share, s_share in zip(present, b_shares, s_shares, strict=True):
            key = _agreed(c_seed, c_pks[j].tobytes(), label)
            sealed[j] = _u8(secagg.seal(key, self.cid, int(peers[j]), b_share, s_share))
        return Reply({"sealed": sealed})

    def _masked(self, message: Message, label: str) -> Reply:
        if message.weights is None:
            raise secagg.SecAggError("a secagg.masked task needs the global model")
        payload, config = message.payload, message.config
        peers = _peers(payload, self.cid)
        present = [j for j, p in enumerate(peers) if p != NO_PEER]
        if len(present) < int(config["secagg_threshold"]):
            raise secagg.SecAggError(
                f"only {len(present)} neighbours are left, below the threshold"
            )
        result = self.inner.handle(Message(FIT, config, message.weights))
        if not isinstance(result, FitResult):
            raise TypeError(f"fit returned {type(result).__name__}, not FitResult")
        delta = flat_delta(result.weights, message.weights)
        if CLIENT_CLIP in config:  # differential privacy: the server cannot clip a masked input
            norm, bound = float(np.linalg.norm(delta)), float(config[CLIENT_CLIP])
            delta *= min(1.0, bound / norm) if norm > 0 else 1.0
        masked = quantized(delta, config)
        secagg.fold(masked, secagg.mask(self._key(label, "b"), masked.size))
        s_seed = self._key(label, "s")
        for j in present:
            pair = secagg.mask(_agreed(s_seed, payload["s_pk"][j].tobytes(), label), masked.size)
            secagg.fold(masked, pair, 1 if self.cid < int(peers[j]) else -1)
        return Reply({"masked": masked})

    def _unmask(self, message: Message, label: str) -> Reply:
        payload = message.payload
        peers, survived = _peers(payload, self.cid), payload["survived"]
        present = [j for j, p in enumerate(peers) if p != NO_PEER]
        needed = int(message.config["secagg_threshold"])
        if int(survived[present].sum()) + 1 < needed:  # itself, and those that sent input
            raise secagg.SecAggError("too few clients sent their input to unmask any")
        c_seed = self._key(label, "c")
        shares = np.zeros((len(peers), secagg.SHARE), np.uint8)
        for j in present:
            try:
                key = _agreed(c_seed, payload["c_pk"][j].tobytes(), label)
                b_share, s_share = secagg.unseal(
                    key, payload["sealed"][j].tobytes(), int(peers[j]), self.cid
                )
            except secagg.SecAggError:
                continue  # a zero row: this neighbour's shares do not open
            shares[j] = _u8(b_share if survived[j] else s_share)
        return Reply({"shares": shares})


@functools.lru_cache(maxsize=16384)
def _agreed(seed: bytes, public: bytes, label: str) -> bytes:
    """The key agreed with a peer, kept a while: the shares stage and the unmask stage of
    a round agree the same keys (an X25519 exchange costs ~50 µs; a simulation holds
    every client's)."""
    return secagg.agree(_private(seed), public, label)


@functools.lru_cache(maxsize=1024)
def _private(seed: bytes) -> X25519PrivateKey:
    return secagg.private_key(seed)


def quantized(delta: npt.NDArray[np.float64], config: Mapping[str, Any]) -> secagg.Ring:
    """The delta as the round quantizes it. The rounding draws follow the task's seed,
    so a simulation and a fleet sum the same integers (the draws reveal nothing: the
    server never sees a quantized update)."""
    rng = np.random.default_rng([int(config["seed"]), 0x5EC])
    return secagg.quantize(
        delta, float(config["secagg_clipping_range"]), int(config["secagg_bits"]), rng
    )


def _once(stage: str, label: str, secret: bytes) -> None:
    with _done_lock:
        if (stage, label, secret) in _done:
            raise secagg.SecAggError(f"{stage} for {label} was answered already: never twice")
        _done.add((stage, label, secret))


def _peers(payload: Weights, cid: int) -> list[int]:
    peers = [int(p) for p in payload["peers"]]
    listed = [p for p in peers if p != NO_PEER]
    if cid in listed or len(set(listed)) != len(listed) or any(p < NO_PEER for p in peers):
        raise secagg.SecAggError(f"the peer list {peers} is not one of distinct other clients")
    return peers


def _u8(data: bytes) -> Array:
    return np.frombuffer(data, np.uint8).copy()


def float_names(weights: Mapping[str, Array]) -> list[str]:
    return [n for n, a in weights.items() if np.issubdtype(np.asarray(a).dtype, np.floating)]


def flat_delta(new: Mapping[str, Array], reference: Weights) -> npt.NDArray[np.float64]:
    """The float tensors' ``new - reference``, one float64 vector in the model's order."""
    parts = [
        np.subtract(np.asarray(new[n]), reference[n], dtype=np.float64).reshape(-1)
        for n in float_names(reference)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


# --- the server side -------------------------------------------------------------------------


class SecureRound:
    """The workflow: `rnd` -> the next aggregate, or None (the round's reason says why).

    With one group the aggregate is the mean of the sampled clients' quantized deltas
    added to the global model. With ``groups`` > 1 the clients are split at random into
    groups that each run SecAgg+ among themselves; each group's mean is one input to the
    strategy's own aggregator, so a robust rule (median, trimmed mean, Krum) runs across
    group means the server may see, while no single update is ever visible."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.held: dict[str, Any] = {}
        """What the server kept of the last round (for tests: no individual update)."""

    def __call__(self, rnd: Round) -> Weights | None:
        strategy, settings, record = rnd.strategy, self.settings, rnd.record
        available = rnd.wait_available(max(strategy.min_available_clients, strategy.min_results, 3))
        cids = rnd.sample(available, strategy.num_fit_clients(len(available)))
        rnd.select(cids)
        largest = -(-len(cids) // settings.groups)
        if largest * ((1 << settings.bits) - 1) >= 1 << secagg.RING_BITS:
            record.reason = (
                f"secure aggregation: a group of {largest} clients could overflow the ring of "
                f"2^{secagg.RING_BITS} with {settings.bits}-bit inputs: lower bits or add groups"
            )
            return None
        if len(cids) < 3 * settings.groups:
            record.reason = (
                f"secure aggregation: {len(cids)} clients cannot form {settings.groups} "
                "groups of at least 3"
            )
            return None
        order = [int(c) for c in rnd.rng.permutation(cids)]
        groups = [sorted(order[g :: settings.groups]) for g in range(settings.groups)]
        graph: dict[int, list[int]] = {}
        needed: dict[int, int] = {}
        for members in groups:
            k = settings.degree(len(members))
            graph.update(secagg.neighbours(members, k, rnd.rng))
            needed.update(dict.fromkeys(members, settings.shares_needed(k)))
        session = _Session(graph, max(len(p) for p in graph.values()))
        label = f"{rnd.coordinator.run_id}/{rnd.number}.{rnd.attempt}"
        base = {
            "secagg_label": label,
            "secagg_clipping_range": settings.clipping_range,
            "secagg_bits": settings.bits,
        }

        def config(cid: int) -> dict[str, Any]:
            return {**base, "secagg_threshold": needed[cid]}

        width = session.width
        spec = {"c_pk": TensorSpec(U8, (secagg.KEY,)), "s_pk": TensorSpec(U8, (secagg.KEY,))}
        for cid, reply in _stage(rnd, KEYS, cids, config, spec, None):
            session.keys[cid] = reply

        spec = {"sealed": TensorSpec(U8, (width, secagg.SEALED))}
        for cid, reply in _stage(rnd, SHARES, list(session.keys), config, spec, session.to_share):
            session.sealed[cid] = (session.row(cid, session.keys), reply["sealed"])

        size = sum(int(np.asarray(rnd.weights[n]).size) for n in float_names(rnd.weights))
        totals = [np.zeros(size, np.uint32) for _ in groups]
        group_of = {cid: g for g, members in enumerate(groups) for cid in members}
        sent: list[int] = []
        spec = {"masked": TensorSpec(U32, (size,))}
        fit_base = rnd.fit_config()
        stage = _stage(rnd, MASKED, list(session.sealed), lambda c: {**fit_base, **config(c)},
                       spec, session.to_mask, model=True)  # fmt: skip
        for cid, reply in stage:
            secagg.fold(totals[group_of[cid]], reply["masked"].view(np.uint32))
            sent.append(cid)
        self.held = {"sums": totals, "sent": sorted(sent)}
        if len(sent) < strategy.min_results:
            record.reason = (
                f"secure aggregation: {len(sent)} masked inputs, fewer than min_results "
                f"{strategy.min_results}"
            )
            return None

        spec = {"shares": TensorSpec(U8, (width, secagg.SHARE))}
        for cid, reply in _stage(
            rnd, UNMASK, sent, config, spec, lambda c: session.to_unmask(c, sent)
        ):
            for slot, peer in enumerate(session.row(cid, session.sealed)):
                if peer == NO_PEER:
                    continue
                if reply["shares"][slot].any():
                    session.given[peer].append(reply["shares"][slot].tobytes())
                else:
                    problem = f"client {cid} could not open the shares it sent"
                    record.failures.setdefault(peer, problem)

        aggregator = strategy.aggregator(rnd.context)
        for g, (members, total) in enumerate(zip(groups, totals, strict=True)):
            inputs = [c for c in members if c in sent]
            try:
                if len(inputs) < max(needed[members[0]], 1):
                    raise secagg.SecAggError(
                        f"{len(inputs)} masked inputs, fewer than the {needed[members[0]]} needed"
                    )
                session.unmask(
                    total, [c for c in members if c in session.sealed], inputs, needed, label
                )
                if int(total.max(initial=0)) > len(inputs) * ((1 << settings.bits) - 1):
                    raise secagg.SecAggError(
                        "the unmasked sum is outside what honest inputs can reach "
                        "(a client sent a malformed masked input)"
                    )
            except secagg.SecAggError as exc:
                where = f" (group {g + 1} of {len(groups)})" if len(groups) > 1 else ""
                record.reason = f"secure aggregation{where}: {exc}"
                return None
            mean = secagg.dequantize(total, len(inputs), settings.clipping_range, settings.bits)
            if isinstance(strategy, DifferentialPrivacy):  # one group: noise on the sum
                record.participants = sorted(sent)
                return _apply_mean(
                    rnd.weights, strategy.noised_mean(mean * len(inputs), rnd.context)
                )
            aggregator.add(_apply_mean(rnd.weights, mean), len(inputs), g)
        record.participants = sorted(sent)
        try:
            return aggregator.result()
        except ValueError as exc:  # e.g. Krum with too few groups for its f
            record.reason = f"{strategy.name} could not aggregate the group sums: {exc}"
            return None


class _Session:
    """One round's graph and what the clients sent: public keys and sealed shares (the
    server cannot open them), and the shares returned for unmasking."""

    def __init__(self, graph: Mapping[int, list[int]], width: int) -> None:
        self.graph, self.width = graph, width
        self.keys: dict[int, Mapping[str, Array]] = {}
        self.sealed: dict[int, tuple[list[int], Array]] = {}
        self.given: dict[int, list[bytes]] = {cid: [] for cid in graph}

    def row(self, cid: int, members: Mapping[int, object]) -> list[int]:
        """`cid`'s neighbours still in `members`, padded to the width."""
        row = [p if p in members else NO_PEER for p in self.graph[cid]]
        return row + [NO_PEER] * (self.width - len(row))

    def keys_of(self, row: list[int], name: str) -> Array:
        blank = np.zeros(secagg.KEY, np.uint8)
        return np.stack([self.keys[p][name] if p != NO_PEER else blank for p in row])

    def addressed(self, cid: int, row: list[int]) -> Array:
        """The sealed shares each peer in `row` sent to `cid`."""
        out = np.zeros((self.width, secagg.SEALED), np.uint8)
        for j, peer in enumerate(row):
            if peer != NO_PEER:
                sender_row, boxes = self.sealed[peer]
                out[j] = boxes[sender_row.index(cid)]
        return out

    def to_share(self, cid: int) -> Weights:
        row = self.row(cid, self.keys)
        return {"peers": np.array(row, np.int64), "c_pk": self.keys_of(row, "c_pk")}

    def to_mask(self, cid: int) -> Weights:
        row = self.row(cid, self.sealed)
        return {"peers": np.array(row, np.int64), "s_pk": self.keys_of(row, "s_pk")}

    def to_unmask(self, cid: int, sent: list[int]) -> Weights:
        row = self.row(cid, self.sealed)
        return {
            "peers": np.array(row, np.int64),
            "c_pk": self.keys_of(row, "c_pk"),
            "sealed": self.addressed(cid, row),
            "survived": np.array([p in sent for p in row], np.uint8),
        }

    def unmask(
        self,
        total: secagg.Ring,
        shared: list[int],
        sent: list[int],
        needed: Mapping[int, int],
        label: str,
    ) -> None:
        """Remove from `total`, in place, the self masks of the clients that `sent` input
        and the masks they shared with clients that `shared` their secrets, then dropped."""
        for cid in shared:
            if cid not in sent and not set(self.sealed[cid][0]) & set(sent):
                continue  # dropped, and no input carries a mask shared with it
            shares = self.given[cid]
            if len(shares) < needed[cid]:
                role = "self mask" if cid in sent else "mask key (it dropped)"
                raise secagg.SecAggError(
                    f"cannot unmask client {cid}: {len(shares)} shares of its {role}, "
                    f"{needed[cid]} needed"
                )
            secret = secagg.combine(sorted(shares, key=lambda s: s[0])[: needed[cid]])
            if cid in sent:
                secagg.fold(total, secagg.mask(secret, total.size), -1)
                continue
            s_sk = secagg.private_key(secret)
            for peer in self.sealed[cid][0]:
                if peer in sent:  # it added this pair's mask with a sign; take it back
                    public = self.keys[peer]["s_pk"].tobytes()
                    pair = secagg.mask(secagg.agree(s_sk, public, label), total.size)
                    secagg.fold(total, pair, -1 if peer < cid else 1)


def _stage(
    rnd: Round,
    kind: str,
    cids: list[int],
    config: Callable[[int], Mapping[str, Any]],
    expects: Spec,
    payload: Callable[[int], Weights] | None,
    *,
    model: bool = False,
) -> list[tuple[int, Mapping[str, Array]]]:
    """Run one stage; the valid replies in client-id order, failures in the record."""
    tasks = rnd.tasks(kind, cids, config=config, payload=payload, send_model=model, expects=expects)
    replies = []
    with rnd.stage(tasks) as outcomes:
        for outcome in outcomes:
            cid = outcome.task.cid
            if isinstance(outcome.result, Reply):
                replies.append((cid, outcome.result.arrays))
            else:
                rnd.record.failures[cid] = f"{kind}: {outcome.error or 'no reply'}"
    for cid in cids:
        if cid not in {c for c, _ in replies}:
            rnd.record.failures.setdefault(cid, f"{kind}: no reply before the round's deadline")
    return sorted(replies, key=lambda r: r[0])


def _apply_mean(reference: Weights, mean: Array) -> Weights:
    """The reference weights with the mean delta added to their float tensors."""
    out, start = dict(reference), 0
    for name in float_names(reference):
        ref = reference[name]
        out[name] = np.add(ref, mean[start : start + ref.size].reshape(ref.shape)).astype(ref.dtype)
        start += ref.size
    return out
