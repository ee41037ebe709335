import gc
import platform
import weakref

from fedge.malloc import limit_arenas, pause_gc, started


def test_arenas_are_capped_on_glibc_only() -> None:
    assert limit_arenas() is (platform.libc_ver()[0] == "glibc")


class Cycle:
    me: object


def test_the_collector_is_off_during_start_up_and_on_after_it() -> None:
    try:
        pause_gc()
        assert not gc.isenabled()
        garbage = Cycle()
        garbage.me = garbage  # a cycle made during start-up
        gone = weakref.ref(garbage)
        del garbage
        started()
        assert gc.isenabled()
        assert gone() is None  # collected once, at the end of start-up
        assert gc.get_freeze_count() > 0  # start-up's survivors are out of the way
    finally:
        gc.unfreeze()
        gc.enable()
