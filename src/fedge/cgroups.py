"""CPU limits for processes started on this machine, through Linux cgroups (v1 or v2).

Why: a benchmark of slow devices on one machine needs node processes that are *really*
slow — every step a node takes (TLS, decoding, training, hashing, uploading) — not a
sleep in `fit`. The kernel's CFS bandwidth control gives each process a quota of CPU
time per period (``share`` of one CPU); it holds even when the machine is idle, so
speeds differ by the ratio of the shares as long as their sum stays below the CPUs
the machine has free. A process is moved into its group after it started: start-up
(imports) would otherwise take minutes at a few percent of a CPU.

Needs write access to the cgroup tree (root, or a delegated subtree). `CpuLimits.detect`
says precisely why it cannot work otherwise.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedge.errors import FedgeError

log = logging.getLogger(__name__)

MOUNT = Path("/sys/fs/cgroup")
MIN_US, MAX_PERIOD_US = 1_000, 1_000_000
"""The kernel's bounds: a quota and a period of at least 1 ms, a period of at most 1 s."""


class CpuLimitError(FedgeError):
    """CPU limits are not available here (no cgroup CPU controller, or no write access)."""


def quota(share: float) -> tuple[int, int]:
    """``(quota_us, period_us)`` for `share` of one CPU, with the shortest period the
    kernel allows, so a slowed process runs steadily rather than in bursts. Measured: a
    6 ms CPU task at 10% of a CPU took 6 to 76 ms (p10 to p90) at 10 ms per 100 ms, and
    50 to 59 ms at 1 ms per 10 ms."""
    if not 0 < share <= 1024:
        raise ValueError(f"a CPU share must be in (0, 1024] CPUs, got {share!r}")
    period = max(MIN_US, math.ceil(MIN_US / share))
    if period > MAX_PERIOD_US:
        raise ValueError(
            f"a CPU share must be >= {MIN_US / MAX_PERIOD_US:g} (1 ms per 1 s), got {share!r}"
        )
    return max(MIN_US, round(share * period)), period


@dataclass
class CpuLimits:
    """Groups named ``PREFIX-NAME`` under `parent`; `close` removes them."""

    parent: Path
    version: Literal[1, 2]
    prefix: str
    groups: list[Path] = field(default_factory=list)

    @classmethod
    def detect(cls, prefix: str, mount: Path = MOUNT, own: str | None = None) -> CpuLimits:
        """The CPU controller of this machine: cgroup v2 (unified) if it has one, else v1's
        ``cpu`` hierarchy; `CpuLimitError` says why neither can be used. `own` is this
        process's v2 cgroup path (read from /proc/self/cgroup by default)."""
        if "cpu" in _read(mount / "cgroup.controllers").split():
            parent = mount / (own if own is not None else _own_v2_group()).lstrip("/")
            if "cpu" not in _read(parent / "cgroup.subtree_control").split():
                try:
                    (parent / "cgroup.subtree_control").write_text("+cpu")
                except OSError as exc:
                    raise CpuLimitError(
                        f"cgroup v2: cannot enable the cpu controller for the children of "
                        f"{parent} ({exc.strerror or exc}); run as root in a cgroup of its own "
                        "(e.g. `systemd-run --scope -p Delegate=yes ...`)"
                    ) from exc
            limits = cls(parent, 2, prefix)
        else:
            for name in ("cpu", "cpu,cpuacct"):
                if (mount / name / "cpu.cfs_quota_us").exists():
                    limits = cls(mount / name, 1, prefix)
                    break
            else:
                raise CpuLimitError(
                    f"no cgroup CPU controller under {mount}: expected cgroup v2's "
                    f"{mount}/cgroup.controllers to list 'cpu', or cgroup v1's "
                    f"{mount}/cpu/cpu.cfs_quota_us"
                )
        if not os.access(limits.parent, os.W_OK):
            raise CpuLimitError(
                f"cgroup v{limits.version}: no write access to {limits.parent}; "
                "CPU limits need root or a delegated cgroup"
            )
        return limits

    def limit(self, name: str, pid: int, share: float) -> Path:
        """Move process `pid` (all its threads) into group ``PREFIX-NAME``, which may use
        `share` of one CPU; returns the group's directory."""
        quota_us, period_us = quota(share)
        group = self.parent / f"{self.prefix}-{name}"
        try:
            group.mkdir(exist_ok=True)
            if group not in self.groups:
                self.groups.append(group)
            if self.version == 2:
                (group / "cpu.max").write_text(f"{quota_us} {period_us}")
            else:
                (group / "cpu.cfs_period_us").write_text(str(period_us))
                (group / "cpu.cfs_quota_us").write_text(str(quota_us))
            (group / "cgroup.procs").write_text(str(pid))
        except OSError as exc:
            raise CpuLimitError(
                f"cgroup v{self.version}: cannot limit process {pid} to {share:g} CPU in "
                f"{group}: {exc.strerror or exc}"
            ) from exc
        return group

    def close(self) -> None:
        """Remove the groups (the kernel refuses while a process is still in one: stop
        the processes first)."""
        for group in self.groups:
            try:
                group.rmdir()
            except OSError as exc:
                log.warning("cannot remove cgroup %s: %s", group, exc.strerror or exc)
        self.groups.clear()

    def __enter__(self) -> CpuLimits:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _own_v2_group() -> str:
    """This process's cgroup v2 path (the ``0::PATH`` line of /proc/self/cgroup)."""
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        if line.startswith("0::"):
            return line[3:]
    return "/"


__all__ = ["CpuLimitError", "CpuLimits", "quota"]
