import platform

from fedge.malloc import limit_arenas


def test_arenas_are_capped_on_glibc_only() -> None:
    assert limit_arenas() is (platform.libc_ver()[0] == "glibc")
