import gc
import platform
import subprocess
import sys

import pytest

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


ARENA_PROBE = """
import ctypes, os, sys, tempfile, threading
import kvwire.tuning
if sys.argv[1] != "untuned":
    assert kvwire.tuning.tune_malloc(arenas=int(sys.argv[1])) is True
barrier = threading.Barrier(6)

def work():
    barrier.wait()
    held = [bytearray(2 << 20) for _ in range(4)]
    barrier.wait()  # every thread holds its memory at once
    del held

threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL("libc.so.6")
libc.fdopen.restype = ctypes.c_void_p
with tempfile.TemporaryFile() as f:
    fp = ctypes.c_void_p(libc.fdopen(os.dup(f.fileno()), b"w"))
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    f.seek(0)
    print(f.read().decode().count("<heap nr="))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_tune_malloc_caps_the_arenas_new_threads_get():
    """Six threads allocating at once get arenas of their own untuned (each a fresh heap,
    every page a fault), and share the capped number tuned; a cap below 1 is refused."""

    def arenas(arg: str) -> int:
        out = subprocess.run([sys.executable, "-c", ARENA_PROBE, arg], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    assert arenas("untuned") > 2
    assert arenas("2") == 2
    assert arenas("1") == 1
    with pytest.raises(ValueError, match="arenas: expected 1 to"):
        kvwire.tuning.tune_malloc(arenas=0)


@pytest.mark.parametrize("kw, error, why", [
    ({"threshold": 4 << 30}, ValueError, "threshold: expected 1 to 2147483647"),  # was masked to 0
    ({"threshold": 0}, ValueError, "threshold"),
    ({"arenas": 2.5}, TypeError, "arenas: expected an int"),
    ({"arenas": True}, TypeError, "arenas: expected an int"),
    ({"arenas": "3"}, TypeError, "arenas: expected an int"),
])  # fmt: skip
def test_tune_malloc_refuses_what_a_c_int_cannot_hold(kw, error, why):
    """mallopt takes C ints: ctypes masked a Python int to one, so 4 GiB became 0 (every
    large allocation mmapped, the opposite of the intent) and the call said True."""
    with pytest.raises(error, match=why):
        kvwire.tuning.tune_malloc(**kw)
