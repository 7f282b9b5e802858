"""What a benchmark process reads about itself (CPU seconds, RSS and its peak), and how
the whole machine's CPU time splits while it runs."""

from __future__ import annotations

import resource


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def rss_bytes() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, kib = line.split()[:2]
                values[key] = int(kib) * 1024
    return values["VmRSS:"], values["VmHWM:"]


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


MACHINE_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_ticks() -> dict[str, int]:
    """The whole machine's CPU time so far, by kind (``/proc/stat``, clock ticks): read it
    before and after a timed window, and pass :func:`machine_delta` of the two to
    :func:`machine_split`. Where two sides
    share the machine (loopback) it shows what no per-process figure does: the kernel's
    receive path run as softirq on behalf of no thread, and whether any CPU stayed idle."""
    try:
        with open("/proc/stat") as f:
            values = f.readline().split()[1:]
    except OSError:
        return {}
    return {kind: int(v) for kind, v in zip(MACHINE_KINDS, values)}


def machine_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Ticks spent in the window, by kind (never negative: the kernel lets iowait go back)."""
    return {kind: max(0, after[kind] - before[kind]) for kind in after if kind in before}


def machine_split(ticks: dict[str, int]) -> dict[str, float]:
    """Shares of user, system, softirq and idle time (and the rest) in tick deltas; empty
    where the machine does not report them."""
    total = sum(ticks.values())
    if not total:
        return {}
    shown = {kind: ticks.get(kind, 0) / total for kind in ("user", "system", "softirq", "idle")}
    return {**shown, "other": max(0.0, 1.0 - sum(shown.values()))}
