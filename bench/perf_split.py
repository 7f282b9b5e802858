"""The whole machine's CPU time over a window, by kind of thread and by what it ran, from
``perf record -a`` (used by ``bench/thread_cpu.py --perf``).

Per-thread counters say how long each thread ran and how much of it in the kernel; they
do not say what the kernel did, and time spent on behalf of no thread (softirq threads,
interrupts) is in none of them. Sampling every CPU at a fixed rate does: a sample is
1/frequency CPU seconds of whatever ran, so dividing by the bytes moved gives CPU seconds
per GB for each (kind of thread, category) pair, idle included, and the columns add up
to the machine.

On a virtual machine perf samples with a timer that fires only where interrupts are
enabled: work done with interrupts off (much of TCP's receive path) is charged to the
point that turns them back on, ``_raw_spin_unlock_irqrestore``, which is why that
symbol gets a category of its own ("irqs-off").
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import tempfile

FREQUENCY = 999

# (category, test on (dso, symbol)), first match wins
CATEGORIES: list[tuple[str, object]] = [
    ("idle", lambda dso, sym: sym in ("pv_native_safe_halt", "default_idle", "acpi_idle_do_entry", "poll_idle")),
    ("copy to user", lambda dso, sym: sym in ("_copy_to_iter", "copy_user_generic", "rep_movs_alternative")),
    ("copy from user", lambda dso, sym: sym == "_copy_from_iter"),
    ("irqs-off", lambda dso, sym: sym.startswith("_raw_spin_unlock_irq")),
    ("softirq", lambda dso, sym: sym in ("handle_softirqs", "__do_softirq", "net_rx_action")),
    ("switch", lambda dso, sym: sym.startswith(("finish_task_switch", "__schedule", "schedule"))),
    ("python", lambda dso, sym: "libpython" in dso),
    ("helper", lambda dso, sym: "_scatter" in dso or "crc32c" in dso),
    ("other user", lambda dso, sym: not dso.startswith("[kernel")),
    ("other kernel", lambda dso, sym: True),
]
NAMES = [name for name, _ in CATEGORIES]


def available() -> str | None:
    """None when ``perf record -a`` can run here, else why not."""
    if shutil.which("perf") is None:
        return "perf is not installed"
    probe = subprocess.run(["perf", "record", "-a", "-o", os.devnull, "--", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"perf record -a failed: {probe.stderr.strip()[-300:]}"


class SystemProfile:
    """``perf record -a`` over exactly the window from :meth:`start` to :meth:`stop`: perf
    starts with its events disabled (:meth:`__init__`, which waits until it runs), and
    the two calls enable and disable them through its control FIFO, each waiting for
    perf's acknowledgement, so perf's own start-up and shutdown fall outside."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="perf-split-")
        self.path = os.path.join(self._dir, "perf.data")
        ctl, ack = os.path.join(self._dir, "ctl"), os.path.join(self._dir, "ack")
        os.mkfifo(ctl)
        os.mkfifo(ack)
        cmd = ["perf", "record", "-a", "-F", str(FREQUENCY), "-D", "-1", "--control", f"fifo:{ctl},{ack}",
               "-o", self.path, "--", "sleep", "100000"]  # fmt: skip
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._ctl = open(ctl, "w")  # opens once perf opened its end
        self._ack = open(ack)

    def _command(self, what: str) -> None:
        self._ctl.write(what + "\n")
        self._ctl.flush()
        if self._ack.readline().replace("\0", "").strip() != "ack":  # perf writes "ack\n\0"
            raise RuntimeError(f"perf did not acknowledge {what!r}")

    def start(self) -> None:
        self._command("enable")

    def stop(self) -> None:
        self._command("disable")
        self._proc.send_signal(signal.SIGINT)
        _, err = self._proc.communicate(timeout=120)
        if not os.path.exists(self.path):
            raise RuntimeError(f"perf record wrote nothing: {err.decode()[-300:]}")

    def samples(self) -> collections.Counter:
        """Samples by (tid, comm, dso, symbol)."""
        out = subprocess.run(["perf", "script", "-i", self.path, "-F", "tid,comm,ip,sym,dso"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return parse_script(out)

    def close(self) -> None:
        self._ctl.close()
        self._ack.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def parse_script(text: str) -> collections.Counter:
    """Count ``perf script -F tid,comm,ip,sym,dso`` lines by (tid, comm, dso, symbol). A
    line is ``<comm> <tid> <ip> <sym>+<offset> (<dso>)``; the command name may hold spaces
    (the tid is its first all-digit field) and the symbol may be missing."""
    counts: collections.Counter = collections.Counter()
    for line in text.splitlines():
        head, _, dso = line.rpartition(" (")
        fields = head.split()
        tid_at = next((i for i, f in enumerate(fields) if f.isdigit()), None)
        if tid_at is None or len(fields) < tid_at + 2:
            continue
        comm, tid = " ".join(fields[:tid_at]), int(fields[tid_at])
        sym = fields[tid_at + 2].split("+")[0] if len(fields) > tid_at + 2 else "[unknown]"
        counts[(tid, comm, dso.rstrip(")"), sym)] += 1
    return counts


def category(dso: str, sym: str) -> str:
    for name, test in CATEGORIES:
        if test(dso, sym):  # type: ignore[operator]
            return name
    raise AssertionError("the last category takes everything")


def split(samples: collections.Counter, thread_kinds: dict[int, str]) -> dict[str, dict[str, float]]:
    """CPU seconds by kind of thread, then category. Threads not in ``thread_kinds`` go by
    their command name (``ksoftirqd``, ``swapper`` for idle CPUs, other processes)."""
    out: dict[str, dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for (tid, comm, dso, sym), n in samples.items():
        kind = thread_kinds.get(tid) or comm.rstrip("0123456789/:-") or "?"
        out[kind][category(dso, sym)] += n / FREQUENCY
    return out


def table(seconds: dict[str, dict[str, float]], gb: float) -> str:
    """CPU s/GB, a row per kind of thread (busiest first) and a total row."""
    used = [c for c in NAMES if any(row.get(c) for row in seconds.values())]
    width = max([len(k) for k in seconds] + [14])
    lines = [f"{'CPU s/GB':<{width}} " + " ".join(f"{c:>14}" for c in used) + f" {'all':>8}"]
    total: dict[str, float] = collections.defaultdict(float)
    for kind, row in sorted(seconds.items(), key=lambda kv: -sum(kv[1].values())):
        for c, v in row.items():
            total[c] += v
        if sum(row.values()) / gb < 0.0005:
            continue
        lines.append(f"{kind:<{width}} " + " ".join(f"{row.get(c, 0.0) / gb:>14.4f}" for c in used)
                     + f" {sum(row.values()) / gb:>8.4f}")  # fmt: skip
    lines.append(f"{'all':<{width}} " + " ".join(f"{total.get(c, 0.0) / gb:>14.4f}" for c in used)
                 + f" {sum(total.values()) / gb:>8.4f}")  # fmt: skip
    return "\n".join(lines)
