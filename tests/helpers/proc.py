"""Child processes for the tests: hang detection instead of fixed timeouts, and never an orphan.

A slow machine (two cores shared with other jobs) must make a test longer, never make it fail. So a
child is not given a deadline; it is *hung* when, for ``HANG_S`` seconds (180 by default; the
environment variable ``LINFORMER_TEST_HANG_S`` sets it), it wrote no output and all its processes
together used less than 0.5% of one core (``MIN_CPU_SHARE``; 0.9 CPU-seconds in 180 s). A starved process still gets some CPU; a
deadlocked one (a rank waiting in a collective for a rank that died, a launcher waiting for its
ranks) gets none.

Each child starts in its own session, so its process group holds everything it starts (the
deepspeed launcher, its per-node launcher and the ranks). On a hang, an exception (a failed
assertion, Ctrl-C, pytest-timeout's last-resort limit) or the child's own exit, whatever is left of
the group is terminated: SIGTERM, then SIGKILL after ``GRACE_S``.

    res = run([sys.executable, "launch/pretrain.py", ...])            # a CompletedProcess
    with start([...]) as child:                                        # a Popen-like handle
        child.wait_until(lambda: marker.exists(), "rank 0 reached step 5")
        child.send_signal(signal.SIGTERM)
        res = child.wait()
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import psutil

ROOT = Path(__file__).resolve().parents[2]

HANG_S = float(os.environ.get("LINFORMER_TEST_HANG_S", "180"))
MIN_CPU_SHARE = 0.005  # hung: no output, and less CPU than this share of one core over the period
GRACE_S = 5.0          # between SIGTERM and SIGKILL
CHECK_EVERY_S = 1.0    # how often the process tree is sampled (a scan of /proc)
TAIL_CHARS = 3000      # of each stream, in a hang's message


class Hang(AssertionError):
    """A child (or this process) made no progress for the hang period; its processes were killed."""


class ProgressWatch:
    """The hang rule, apart from any process: feed it samples, ask whether it is stalled.

    Progress is new output, a change in the set of processes, or ``MIN_CPU_SHARE x hang_s`` of CPU
    time used since the last progress (a CPU total that falls, as when a process exits, only moves
    the mark).
    """

    def __init__(self, hang_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic):
        self.hang_s = HANG_S if hang_s is None else hang_s
        self.min_cpu_s = MIN_CPU_SHARE * self.hang_s
        self.clock = clock
        self.last_progress = clock()
        self._cpu: Optional[float] = None
        self._output = -1
        self._pids: frozenset = frozenset()

    def update(self, cpu_s: float, output_bytes: int = 0, pids: Iterable[int] = ()) -> None:
        pids = frozenset(pids)
        if (self._cpu is None or output_bytes != self._output or pids != self._pids
                or cpu_s - self._cpu >= self.min_cpu_s):
            self.last_progress = self.clock()
            self._cpu, self._output, self._pids = cpu_s, output_bytes, pids
        elif cpu_s < self._cpu:
            self._cpu = cpu_s

    @property
    def stalled_s(self) -> float:
        return self.clock() - self.last_progress

    @property
    def hung(self) -> bool:
        return self.stalled_s > self.hang_s

    def describe(self) -> str:
        return (f"no output and under {self.min_cpu_s:.2g} s of CPU for {self.stalled_s:.0f} s "
                f"(hang period {self.hang_s:g} s, LINFORMER_TEST_HANG_S)")


def cpu_seconds(procs: Iterable[psutil.Process]) -> float:
    """User + system CPU of the processes, including their children that already exited."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def tree(roots: Iterable[psutil.Process]) -> list[psutil.Process]:
    """The processes and their descendants that are still running."""
    out: dict[int, psutil.Process] = {}
    for p in roots:
        try:
            out.setdefault(p.pid, p)
            for c in p.children(recursive=True):
                out.setdefault(c.pid, c)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return [p for p in out.values() if _running(p)]


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def group_members(pgid: int) -> list[psutil.Process]:
    """Running processes of a process group (orphans whose parent died included)."""
    members = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid:
                p = psutil.Process(pid)
                if _running(p):
                    members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return members


def terminate(procs: Sequence[psutil.Process], pgid: Optional[int] = None, grace_s: float = GRACE_S) -> None:
    """SIGTERM the group (or the processes), SIGKILL whatever is left after ``grace_s``."""
    def signal_all(sig):
        if pgid is not None:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for p in procs:
            try:
                p.send_signal(sig)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_running(p) for p in procs):
        time.sleep(0.05)
    signal_all(signal.SIGKILL)


def _tail(text: str) -> str:
    return text if len(text) <= TAIL_CHARS else "..." + text[-TAIL_CHARS:]


def interrupt_on_sigterm(signum, frame):
    """A SIGTERM handler that unwinds like Ctrl-C (the test run's own, see tests/conftest.py)."""
    raise KeyboardInterrupt(f"signal {signum}")


_live: "weakref.WeakSet[Child]" = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:  # a child nobody waited for must not outlive the test session
    for child in list(_live):
        child.kill()


class Child:
    """A child process in its own session, its stdout and stderr collected by threads; Popen-like
    (pid, args, poll, send_signal, returncode) plus wait() -> CompletedProcess and wait_until()."""

    def __init__(self, args: Sequence[str], *, cwd: Path | str = ROOT, env: Optional[dict] = None,
                 input: Optional[str] = None, hang_s: Optional[float] = None):
        self.args = list(map(str, args))
        self.popen = subprocess.Popen(
            self.args, cwd=cwd, env=env, start_new_session=True,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pid = self.popen.pid
        self.pgid = self.pid  # start_new_session: the child leads its own group
        self._leader = psutil.Process(self.pid)
        self._chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
        self._bytes = {"stdout": 0, "stderr": 0}  # one counter per reader thread
        self._threads = [threading.Thread(target=self._read, args=(self.popen.stdout, "stdout"), daemon=True),
                         threading.Thread(target=self._read, args=(self.popen.stderr, "stderr"), daemon=True)]
        if input is not None:
            self._threads.append(threading.Thread(target=self._write, args=(input,), daemon=True))
        for t in self._threads:
            t.start()
        self.watch = ProgressWatch(hang_s)
        self._next_check = 0.0
        self._known: dict[int, psutil.Process] = {}  # every process seen in the tree, to kill at the end
        _live.add(self)

    # ------------------------------------------------------------------------------ Popen-like

    @property
    def returncode(self) -> Optional[int]:
        return self.popen.returncode

    def poll(self) -> Optional[int]:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        """To the child itself (not its group), as Popen.send_signal."""
        self.popen.send_signal(sig)

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()

    # ---------------------------------------------------------------------------------- output

    def _read(self, pipe, name: str) -> None:
        for chunk in iter(lambda: os.read(pipe.fileno(), 65536), b""):
            self._chunks[name].append(chunk)
            self._bytes[name] += len(chunk)
        pipe.close()

    def _write(self, text: str) -> None:
        try:
            self.popen.stdin.write(text.encode())
            self.popen.stdin.close()
        except (BrokenPipeError, OSError):
            pass

    def text(self, name: str) -> str:
        return b"".join(self._chunks[name]).decode(errors="replace")

    def _tails(self) -> str:
        return (f"\n--- stdout (end) ---\n{_tail(self.text('stdout'))}"
                f"\n--- stderr (end) ---\n{_tail(self.text('stderr'))}")

    # ---------------------------------------------------------------------------------- waiting

    def _processes(self) -> list[psutil.Process]:
        procs = {p.pid: p for p in group_members(self.pgid)}
        for p in tree([self._leader]):  # a descendant that left the group is still ours
            procs.setdefault(p.pid, p)
        self._known.update(procs)
        return list(procs.values())

    def check(self) -> None:
        """Sample the tree (at most once a second); on a hang, kill everything and raise Hang."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CHECK_EVERY_S
        procs = self._processes()
        self.watch.update(cpu_seconds(procs), sum(self._bytes.values()), (p.pid for p in procs))
        if self.watch.hung:
            self.kill()
            raise Hang(f"{' '.join(self.args[:4])} ...: {self.watch.describe()}; killed its process "
                       f"group{self._tails()}")

    def wait_until(self, predicate: Callable[[], bool], what: str, poll_s: float = 0.1) -> None:
        """Wait for ``predicate()`` (a state the child should reach) as long as the child progresses."""
        while not predicate():
            if self.popen.poll() is not None:
                raise AssertionError(f"{' '.join(self.args[:4])} ... exited with {self.popen.returncode} "
                                     f"before {what}{self._tails()}")
            self.check()
            time.sleep(poll_s)

    def wait(self) -> subprocess.CompletedProcess:
        """Wait for the child to exit (as long as it progresses); then kill what is left of its group
        and return stdout and stderr as text."""
        try:
            while True:
                try:
                    self.popen.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    self.check()
            # the child is gone: its output ends when the last process holding the pipes does
            deadline = time.monotonic() + GRACE_S
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))
        finally:
            self.kill()
        return subprocess.CompletedProcess(self.args, self.popen.returncode, self.text("stdout"),
                                           self.text("stderr"))

    def kill(self) -> None:
        """Terminate whatever is left of the child's group and tree; reap the child."""
        try:
            procs = self._processes()
            seen = {p.pid for p in procs}
            procs += [p for pid, p in self._known.items() if pid not in seen and _running(p)]
            if procs:
                terminate(procs, self.pgid if group_members(self.pgid) else None)
            try:
                self.popen.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:  # cannot happen after SIGKILL, unless in the kernel
                self.popen.kill()
                self.popen.wait()
            for t in self._threads:
                t.join(GRACE_S)
        finally:
            _live.discard(self)


def start(args: Sequence[str], **kw) -> Child:
    return Child(args, **kw)


def run(args: Sequence[str], **kw) -> subprocess.CompletedProcess:
    """subprocess.run(args, capture_output=True, text=True), with hang detection instead of a
    timeout, and no process of the child left behind."""
    with Child(args, **kw) as child:
        return child.wait()


def _processes_of(pids: Iterable[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            out.append(psutil.Process(pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return tree(out)


def wait_for_processes(done: Callable[[], bool], what: str, pids: Callable[[], Iterable[int]],
                       hang_s: Optional[float] = None, poll_s: float = 0.2) -> None:
    """Wait for ``done()`` while the processes ``pids()`` (and their descendants) progress; for
    workers not started through Child (multiprocessing). On a hang, kills them and raises Hang;
    raises AssertionError when they all ended first."""
    watch = ProgressWatch(hang_s)
    ended_at = None
    while not done():
        procs = _processes_of(pids())
        if not procs:
            # a process whose main thread has exited shows as a zombie a moment before it can be
            # waited for (its other threads are still going): only a lasting absence is an end
            ended_at = ended_at or time.monotonic()
            if time.monotonic() - ended_at > GRACE_S:
                raise AssertionError(f"the processes ended before {what}")
            time.sleep(poll_s)
            continue
        ended_at = None
        watch.update(cpu_seconds(procs), 0, (p.pid for p in procs))
        if watch.hung:
            terminate(procs)
            raise Hang(f"waiting for {what}: {watch.describe()}; killed them")
        time.sleep(poll_s)


def kill_trees(pids: Iterable[int]) -> None:
    """Terminate the processes and their descendants (SIGTERM, then SIGKILL)."""
    procs = _processes_of(pids)
    if procs:
        terminate(procs)
