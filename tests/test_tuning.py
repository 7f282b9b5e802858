import gc
import platform

import kvwire


def test_tune_process_freezes_the_collector_and_tunes_glibc():
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    kvwire.tune_process()
    assert gc.get_freeze_count() > 0  # the long-lived objects moved to the permanent generation
    gc.unfreeze()
    if platform.libc_ver()[0] == "glibc":
        assert kvwire.tuning.tune_malloc() is True


def test_tune_process_can_do_nothing():
    gc.unfreeze()
    kvwire.tune_process(freeze_gc=False, malloc=False)
    assert gc.get_freeze_count() == 0
