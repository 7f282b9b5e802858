"""kvwire's threads, named for the operating system too.

Python names a thread for itself only; ``top -H``, ``ps -L``, ``perf`` and ``py-spy``
show the process's name for every thread. Each kvwire thread sets its kernel name
(``kvwire-recv``, ``kvwire-send-2``, ...; at most 15 bytes, Linux) as it starts, so an
operator can see which of them takes the CPU:

    top -H -p <pid>        # or: ps -L -o tid,comm,pcpu -p <pid>
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

PR_SET_NAME = 15  # linux/prctl.h
NAME_BYTES = 15  # the kernel keeps 16 bytes with the terminating zero

_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
    except (OSError, AttributeError):  # no libc to load: threads keep the process's name
        _prctl = None


def set_native_name(name: str) -> bool:
    """Give the calling thread ``name`` (cut to 15 bytes) in the kernel; whether it could."""
    if _prctl is None:
        return False
    encoded = name.encode("ascii", "replace")[:NAME_BYTES]
    return _prctl(PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0) == 0


class Thread(threading.Thread):
    """A daemon :class:`threading.Thread` that names itself for the kernel when it starts."""

    def __init__(self, target, name: str, args: tuple = ()) -> None:
        super().__init__(target=target, name=name, args=args, daemon=True)

    def run(self) -> None:
        set_native_name(self.name)
        super().run()
