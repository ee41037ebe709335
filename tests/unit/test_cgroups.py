"""CPU limits through cgroups: the files written for v1 and v2 (in a fake cgroup tree),
the refusals, and — where this machine lets us — a real process moved into a group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedge.cgroups import CpuLimitError, CpuLimits, quota


def test_quota_uses_the_shortest_period_the_kernel_allows() -> None:
    assert quota(0.1) == (1_000, 10_000)  # 1 ms per 10 ms: steady, not one 10 ms burst
    assert quota(0.01) == (1_000, 100_000)
    assert quota(0.002) == (1_000, 500_000)
    assert quota(2.5) == (2_500, 1_000)  # the period cannot go under 1 ms
    with pytest.raises(ValueError, match=r"must be >= 0.001 \(1 ms per 1 s\), got 0.0005"):
        quota(0.0005)
    with pytest.raises(ValueError, match=r"must be in \(0, 1024\] CPUs, got 0"):
        quota(0)


def _v1(mount: Path) -> Path:
    cpu = mount / "cpu"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("-1")
    return cpu


def test_v1_groups_get_a_period_a_quota_and_the_process(tmp_path: Path) -> None:
    cpu = _v1(tmp_path)
    with CpuLimits.detect("bench", tmp_path) as limits:
        assert (limits.version, limits.parent) == (1, cpu)
        group = limits.limit("node-3", 4242, 0.05)
        assert group == cpu / "bench-node-3"
        assert (group / "cpu.cfs_period_us").read_text() == "20000"
        assert (group / "cpu.cfs_quota_us").read_text() == "1000"
        assert (group / "cgroup.procs").read_text() == "4242"
        for name in ("cpu.cfs_period_us", "cpu.cfs_quota_us", "cgroup.procs"):
            (group / name).unlink()  # a real group's files vanish with it
    assert not group.exists()


def test_v2_enables_the_cpu_controller_below_its_own_group(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    own = tmp_path / "bench.scope"
    own.mkdir()
    (own / "cgroup.subtree_control").write_text("")
    limits = CpuLimits.detect("bench", tmp_path, own="/bench.scope")
    assert (limits.version, limits.parent) == (2, own)
    assert (own / "cgroup.subtree_control").read_text() == "+cpu"
    group = limits.limit("node-0", 77, 0.01)
    assert (group / "cpu.max").read_text() == "1000 100000"
    assert (group / "cgroup.procs").read_text() == "77"


def test_v2_says_why_when_the_cpu_controller_cannot_be_enabled(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    (tmp_path / "cgroup.subtree_control").mkdir()  # cannot be written: as EBUSY would
    with pytest.raises(CpuLimitError, match="cgroup v2: cannot enable the cpu controller"):
        CpuLimits.detect("bench", tmp_path, own="/")


def test_without_a_cpu_controller_detect_names_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")  # v2 without cpu
    with pytest.raises(CpuLimitError, match=r"no cgroup CPU controller under .*cpu.cfs_quota_us"):
        CpuLimits.detect("bench", tmp_path)


def test_a_failed_limit_names_the_process_the_share_and_the_group(tmp_path: Path) -> None:
    cpu = _v1(tmp_path)
    (cpu / "bench-x").write_text("a file where the group should be")
    limits = CpuLimits.detect("bench", tmp_path)
    with pytest.raises(CpuLimitError, match=r"cannot limit process 9 to 0.1 CPU in .*bench-x"):
        limits.limit("x", 9, 0.1)


def _real_limits() -> CpuLimits:
    try:
        return CpuLimits.detect("fedge-test")
    except CpuLimitError as exc:
        pytest.skip(f"no cgroup CPU limits here: {exc}")


def test_a_real_process_is_moved_into_its_group_and_the_group_removed_after() -> None:
    limits = _real_limits()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        group = limits.limit(f"pid{proc.pid}", proc.pid, 0.05)
        membership = Path(f"/proc/{proc.pid}/cgroup").read_text()
        assert f"/{group.name}\n" in membership, membership
        quota_file = "cpu.max" if limits.version == 2 else "cpu.cfs_quota_us"
        assert (group / quota_file).read_text().split()[0] == "1000"
    finally:
        proc.kill()
        proc.wait()
    limits.close()
    assert not group.exists()
