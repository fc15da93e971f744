"""The tests' process helper (helpers/proc.py) and in-process guard (helpers/inprocess.py): a child
that hangs is killed with everything it started; a slow child that prints or computes is not."""

from __future__ import annotations

import signal
import sys
import textwrap
import time

import psutil
import pytest

from helpers import proc
from helpers.inprocess import call


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


# A child that starts a grandchild (in its group, or in a session of its own), says both pids and
# then waits silently: what a launcher whose rank is stuck in a collective looks like.
SILENT_FAMILY = """
    import subprocess, sys, time
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session={escape})
    print("pids", g.pid, flush=True)
    time.sleep(600)
"""


def _pids(child: proc.Child) -> list[int]:
    line = next(li for li in child.text("stdout").splitlines() if li.startswith("pids"))
    return [child.pid, *map(int, line.split()[1:])]


def _gone(pids: list[int], within_s: float = 10.0) -> bool:
    """Every process has ended (or is a zombie): a SIGKILL takes effect once the kernel runs it."""
    def ended(pid):
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(map(ended, pids)):
            return True
        time.sleep(0.05)
    return False


def test_a_silent_hang_is_killed_with_its_grandchildren():
    t0 = time.monotonic()
    child = proc.start(_script(SILENT_FAMILY.format(escape=False)), hang_s=2)
    with pytest.raises(proc.Hang, match=r"no output and under .* of CPU for \d+ s .*killed its process group"):
        child.wait()
    assert 2 <= time.monotonic() - t0 < 2 + 3 * proc.CHECK_EVERY_S + proc.GRACE_S + 5
    assert child.returncode == -signal.SIGTERM
    assert "pids" in child.text("stdout")
    assert _gone(_pids(child))


def test_an_exception_in_the_test_kills_the_family_even_one_that_left_the_group():
    with pytest.raises(RuntimeError):
        with proc.start(_script(SILENT_FAMILY.format(escape=True))) as child:
            child.wait_until(lambda: "pids" in child.text("stdout"), "the grandchild started")
            pids = _pids(child)
            assert psutil.Process(pids[1]).status() != psutil.STATUS_ZOMBIE
            raise RuntimeError("the test failed")
    assert _gone(pids)


def test_a_slow_child_that_keeps_printing_is_not_killed():
    res = proc.run(_script("""
        import time
        for i in range(8):
            print("still working", i, flush=True)
            time.sleep(0.4)
    """), hang_s=1.0)
    assert res.returncode == 0 and res.stdout.count("still working") == 8


def test_a_slow_child_that_computes_silently_is_not_killed():
    res = proc.run(_script("""
        import sys, time
        t = time.monotonic()
        while time.monotonic() - t < 3:
            sum(range(10000))
        sys.stderr.write("done\\n")
        sys.exit(3)
    """), hang_s=1.0)
    assert res.returncode == 3 and res.stderr == "done\n" and res.stdout == ""


def test_a_child_that_exits_before_the_awaited_state_fails_with_its_output():
    with proc.start(_script("import sys; print('bye'); sys.exit(4)")) as child:
        with pytest.raises(AssertionError, match=r"exited with 4 before the marker appeared(.|\n)*bye"):
            child.wait_until(lambda: False, "the marker appeared")


def test_leftovers_of_a_child_that_exited_are_killed():
    """A launcher that dies and leaves a rank behind: the rank is killed when the child is waited for."""
    res = proc.run(_script("""
        import subprocess, sys
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print("pids", g.pid, flush=True)
    """))
    assert res.returncode == 0
    assert _gone([int(res.stdout.split()[1])])


def test_the_hang_rule():
    now = [0.0]
    watch = proc.ProgressWatch(hang_s=10, clock=lambda: now[0])
    watch.update(cpu_s=5.0, output_bytes=100, pids=[1, 2])
    for t in range(1, 11):  # idle: a trickle of CPU (a launcher's poll loop) is no progress
        now[0] = t
        watch.update(cpu_s=5.0 + 0.001 * t, output_bytes=100, pids=[1, 2])
    assert not watch.hung
    now[0] = 10.5
    assert watch.hung and watch.stalled_s == 10.5
    watch.update(cpu_s=5.0, output_bytes=101, pids=[1, 2])  # one byte of output
    assert not watch.hung and watch.stalled_s == 0
    now[0] = 30
    watch.update(cpu_s=5.0 + 1.01 * watch.min_cpu_s, output_bytes=101, pids=[1, 2])  # computing
    assert watch.stalled_s == 0
    now[0] = 31
    watch.update(cpu_s=1.0, output_bytes=101, pids=[1, 2, 3])  # a process started (and one's CPU left)
    assert watch.stalled_s == 0
    now[0] = 40
    watch.update(cpu_s=0.5, output_bytes=101, pids=[1, 2, 3])  # CPU that falls only moves the mark
    now[0] = 42
    watch.update(cpu_s=0.5 + 1.01 * watch.min_cpu_s, output_bytes=101, pids=[1, 2, 3])
    assert watch.stalled_s == 0


def test_an_in_process_case_that_blocks_is_reported_as_a_hang():
    def blocks(argv):
        time.sleep(600)

    def prints_slowly(argv):
        for _ in range(8):
            print("working", file=sys.stderr)
            time.sleep(0.3)
        return 0

    t0 = time.monotonic()
    assert call(blocks, [], hang_s=1.5).code == "hang"
    assert time.monotonic() - t0 < 1.5 + 3 * proc.CHECK_EVERY_S
    assert call(prints_slowly, [], hang_s=1.0).code == 0


def test_workers_started_elsewhere_are_watched_too():
    """wait_for_processes (the loader test's multiprocessing ranks): a silent hang kills them; a
    worker that ends before the awaited state fails the wait, after a grace period (a process whose
    main thread exited shows as a zombie a moment before it can be waited for)."""
    import subprocess

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    quitter = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        with pytest.raises(proc.Hang, match="waiting for the result: no output"):
            proc.wait_for_processes(lambda: False, "the result", lambda: [sleeper.pid], hang_s=1.0)
        assert sleeper.wait(timeout=30) == -signal.SIGTERM
        t0 = time.monotonic()
        with pytest.raises(AssertionError, match="the processes ended before the result"):
            proc.wait_for_processes(lambda: False, "the result",
                                    lambda: [quitter.pid] if quitter.poll() is None else [])
        assert time.monotonic() - t0 >= proc.GRACE_S
        proc.wait_for_processes(lambda: quitter.poll() is not None, "the exit", lambda: [quitter.pid])
    finally:
        proc.kill_trees([sleeper.pid, quitter.pid])
        sleeper.wait(), quitter.wait()


def test_a_sigterm_to_the_test_run_unwinds_like_ctrl_c():
    """So the cleanup of the running test (and atexit) kills its children, which live in sessions
    of their own and would not get the signal."""
    import os

    assert signal.getsignal(signal.SIGTERM) is proc.interrupt_on_sigterm
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)


def test_deepspeed_shared_memory_left_by_a_finished_job_is_removed():
    """helpers/shm.py: a segment a live process maps stays (a running job's); an unmapped one goes
    when its job was ours (its port) or it has not been written for a while (not one being
    created by another session's job right now); one older than the session is not ours to judge."""
    import mmap
    import os

    from helpers import shm

    since = time.time() - 3 * shm.QUIET_S
    quiet = since + shm.QUIET_S  # written long enough ago
    port = 40000 + os.getpid() % 20000
    names = {kind: shm.SHM / f"{shm.PREFIX}{os.getpid()}_test.{kind}_{port + i}_0"
             for i, kind in enumerate(["mapped", "ended", "fresh", "old", "ours"])}
    try:
        for p in names.values():
            p.write_bytes(b"\0" * 4096)
        for kind, t in [("mapped", quiet), ("ended", quiet), ("old", since - 3600)]:
            os.utime(names[kind], (t, t))
        planted = set(names.values())  # other jobs on a shared machine leave segments too: judge ours
        with open(names["mapped"], "r+b") as f, mmap.mmap(f.fileno(), 4096):
            removed = shm.remove_leftovers([port + 4], since=since)
            assert sorted(p for p in removed if p in planted) == sorted([names["ended"], names["ours"]])
            assert all(names[k].exists() for k in ("mapped", "fresh", "old"))
        assert [p for p in shm.remove_leftovers(since=since) if p in planted] == [names["mapped"]]
    finally:
        for p in names.values():
            p.unlink(missing_ok=True)
