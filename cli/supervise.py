"""The supervisor of one process of a multi-process run: a dead process 0 reported as one `error:` line.

Process 0 of a run hosts JAX's coordination service. When it dies (killed, out of memory, its host gone),
JAX's client in every other process finds the service unreachable and ends its process itself: an absl
FATAL log ("Terminating process because the JAX distributed service detected fatal errors …"), a C++
stack trace, SIGABRT. jaxlib can take a callback for that moment, but only through its private client
constructor, which `jax.distributed.initialize` does not expose. So each process of a run watches its
work from the outside instead: the command the user started (`featdp extract` / `featdp fit` with a
process group, `featdp_cli.main._process_group`) becomes this thin supervisor, which runs the same command
line again as its child and waits for it.

The contract:

* **The child** is the same command line (`sys.executable` and `sys.orig_argv`), the same environment
  plus `MARK` (the supervisor's pid), so it runs the job instead of supervising again (`is_child`). Its
  stdin and stdout are the supervisor's own (a terminal keeps its progress bars); its stderr passes
  through the supervisor, line by line, unchanged, except that
    - an absl log line (`I…`, `W…`, `E…`) and the lines after it (its own continuation lines) are held
      for `HOLD_S` seconds, so that the ones that open a fatal report can be taken out of it (times are
      when the supervisor read the lines from the pipe: the lines held that long when the next one was
      read are written before it is looked at, however late the supervisor gets to it);
    - an `error:` line (the last thing the CLI prints) and all after it are held until the child ends;
    - from JAX's fatal line on, everything goes to a report file instead (`tempfile`, named in the
      message).
* **The outcome** (`run`'s `Outcome`): when the child printed JAX's fatal line and then ended abnormally
  (a signal, SIGABRT, or a non-zero exit), `message` is one line naming what happened, its coordinator
  and its process: "process 0 (the coordinator at HOST:PORT) stopped responding (…)" when the service
  was unreachable, JAX's own status otherwise; the held `error:` lines are dropped (a child that saw a
  broken collective first says "lost contact", less precise). The caller prints `message` as its one
  `error:` line and exits 2. Any other ending passes through: the held lines are written, `returncode`
  is the child's (negative: killed by that signal), and `exit_like` ends the supervisor the same way.
* **Signals**: SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to the supervisor are forwarded
  to the child, once: a SIGINT or SIGQUIT is not forwarded while the supervisor's process group owns its
  terminal, since the terminal (Ctrl-C, Ctrl-\\) sent it to the child too (a signal sent to the whole
  process group by other means reaches the child twice). The child then ends as it would unsupervised
  (JAX's preemption notifier catches SIGTERM in a process group: the child logs it and carries on). The
  child dies with the supervisor (`adopt`: Linux's parent-death signal, elsewhere a watcher thread), so
  killing the process the user started, even with SIGKILL, leaves no orphan.

POSIX only (`available`), and only a command read from this process's own command line (`command_line`;
not arguments handed to the CLI by a caller, such as CliRunner): elsewhere a run is not supervised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import re
import signal
import sys
import tempfile
import threading
import time

MARK = "FEATDP_SUPERVISOR_PID"
HOLD_S = 1.0  # how long an absl log line is held back: a fatal report's first lines come within milliseconds
DRAIN_S = 2.0  # how long stderr is still read after the child has ended (a grandchild may hold it open)
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
_FROM_TERMINAL = ("SIGINT", "SIGQUIT")

# absl's log prefix: severity, MMDD hh:mm:ss.micros, thread id, file:line].
_ABSL_LINE = re.compile(rb"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+\s+\d+ [^\]\s]+:\d+\] ")
# The line JAX's distributed client ends a process with (`client.h`; older versions: "the coordinator
# detected missing heartbeats").
_JAX_FATAL = re.compile(rb"^F\d{4} .*Terminating process because the (JAX distributed service|coordinator) detected")
_STATUS = re.compile(r"(?:absl::)?Status: (.*)")
# Status codes meaning that the coordination service could not be reached (gRPC's, as absl spells them).
_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How the child ended: `returncode` as `subprocess` gives it (negative: the signal that killed it);
    `message`: the one line that says so when JAX's distributed runtime ended it, else None."""

    returncode: int
    message: str | None = None
    report: str | None = None  # the file that holds JAX's fatal report, when there was one


def available() -> bool:
    return os.name == "posix"


def is_child() -> bool:
    """Whether this process was started by a supervisor (and must run the job, not supervise it)."""
    return bool(os.environ.get(MARK))


def command_line() -> list[str] | None:
    """This process's own command line, to run again: the interpreter, its options, script and arguments;
    None unless the arguments the CLI parsed (`sys.argv[1:]`) are how it ends (a script that set
    `sys.argv` itself is not run again)."""
    arguments = sys.argv[1:]
    if not arguments or sys.orig_argv[len(sys.orig_argv) - len(arguments):] != arguments:
        return None
    return [sys.executable, *sys.orig_argv[1:]]


def adopt() -> None:
    """In the child: die with the supervisor. Linux: the parent-death signal (SIGKILL, as the supervisor
    got if it was killed); elsewhere a thread that watches the parent pid. The mark is removed from the
    environment, so that no grandchild takes itself for a supervised child."""
    mark = os.environ.pop(MARK, "")
    parent = int(mark) if mark.isdigit() else -1
    armed = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            pr_set_pdeathsig = 1
            armed = ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0) == 0
    if os.getppid() != parent:  # the supervisor died before the signal was armed, or the mark is stale
        with contextlib.suppress(OSError):
            os.write(2, f"error: {MARK}={mark} names no parent of this process (featdp sets it for the "
                        "child of its supervisor only, which has ended); unset it\n".encode())
        os._exit(2)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="featdp-supervisor").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)


def run(command: list[str], *, coordinator: str, process_id: int, num_processes: int,
        stderr_fd: int = 2, env: dict[str, str] | None = None, hold_s: float = HOLD_S) -> Outcome:
    """Runs `command` as the supervised child of this process (module docstring) and waits for it; its
    stderr goes to `stderr_fd` (the raw descriptor: a rich display in this process may have replaced
    `sys.stderr`); absl log lines are held for `hold_s` seconds."""
    import subprocess

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    child_env = {**(os.environ if env is None else env), MARK: str(os.getpid())}
    with _Forwarding() as forwarding:
        reading, writing = os.pipe()  # a raw pipe: the reader closes its end, whenever the writers are done
        try:
            child = subprocess.Popen(command, stderr=writing, env=child_env)
        except OSError as error:
            os.close(reading)
            return Outcome(2, f"process {process_id} of {num_processes} could not start its job "
                              f"({error.strerror or error}): {command[0]}")
        finally:
            os.close(writing)
        forwarding.to(child)
        sieve = _Sieve(stderr_fd, hold_s)
        lines: queue.Queue = queue.Queue()
        clock = threading.Lock()  # held by the reader from reading a line's time to queueing the line
        threading.Thread(target=_read_lines, args=(reading, lines, clock), daemon=True).start()
        ended_at = None
        while True:
            try:
                item = lines.get(timeout=0.1)
            except queue.Empty:
                item = ()
            if item is None:  # end of the child's stderr
                break
            if item:
                read_at, line = item
                sieve.feed(line, read_at)
            else:
                with clock:
                    now = time.monotonic()
                    idle = lines.empty()
                if idle:  # every line read before `now` has been fed
                    sieve.release(now)
            if child.poll() is not None:
                now = time.monotonic()
                ended_at = ended_at or now
                if now - ended_at > DRAIN_S:
                    break
        returncode = child.wait()
    return sieve.close(returncode, coordinator, process_id, num_processes)


def _read_lines(fd: int, lines: queue.Queue, clock: threading.Lock) -> None:
    """Puts each line read from `fd` on `lines` as (the `time.monotonic()` it was read at, the line; the
    last one may lack its newline), then None. `clock` is held from reading the time to queueing the lines,
    so that a time read under it with `lines` empty comes after every line queued with an earlier one."""
    pending = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 1 << 16):
            with clock:
                read_at = time.monotonic()
                *complete, pending = (pending + chunk).split(b"\n")
                for line in complete:
                    lines.put((read_at, line + b"\n"))
    if pending:
        with clock:
            lines.put((time.monotonic(), pending))
    lines.put(None)
    os.close(fd)


class _Sieve:
    """The child's stderr on its way through: written at once, held (absl lines and the lines that follow
    them, such as their own continuation lines; `error:` lines and all after them), or kept for the report
    (from JAX's fatal line on)."""

    def __init__(self, fd: int, hold_s: float = HOLD_S):
        self._fd = fd
        self._hold_s = hold_s
        self._held: list[tuple[float, bytes]] = []  # from an absl line on, each with the time it was read
        self._tail: list[bytes] = []  # from the first `error:` line on: held until the child has ended
        self._report: list[bytes] | None = None  # JAX's fatal report, once its line has come
        self._fatal = b""

    def feed(self, line: bytes, now: float) -> None:
        """Takes `line`, read at `now`, after writing the lines held for `hold_s` by then (no fatal line
        came within that time)."""
        self.release(now)
        if self._report is not None:
            self._report.append(line)
        elif _JAX_FATAL.match(line):
            self._fatal = line
            self._report = [held for _, held in self._held] + [line]
            self._held = []
        elif self._tail or line.startswith(b"error:"):
            self._tail += [held for _, held in self._held] + [line]
            self._held = []
        elif self._held or _ABSL_LINE.match(line):
            self._held.append((now, line))
        else:
            self._write(line)

    def release(self, now: float) -> None:
        """Writes the lines held for `hold_s` by `now`: the caller has fed every line read before `now`, so
        no fatal report followed them in that time."""
        while self._held and now - self._held[0][0] >= self._hold_s:
            self._write(self._held.pop(0)[1])

    def close(self, returncode: int, coordinator: str, process_id: int, num_processes: int) -> Outcome:
        if self._report is not None and returncode != 0:
            report = self._save(self._tail + self._report)
            return Outcome(returncode, _message(self._fatal, coordinator, process_id, num_processes, report),
                           report)
        for line in [held for _, held in self._held] + self._tail + (self._report or []):
            self._write(line)
        return Outcome(returncode)

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self._fd, data):]

    @staticmethod
    def _save(lines: list[bytes]) -> str | None:
        try:
            fd, path = tempfile.mkstemp(prefix="featdp-jax-fatal-", suffix=".log")
            with os.fdopen(fd, "wb") as report:
                report.writelines(lines)
            return path
        except OSError:
            return None


def _message(fatal: bytes, coordinator: str, process_id: int, num_processes: int, report: str | None) -> str:
    """The one line for a child that JAX's distributed runtime ended, from its fatal line."""
    found = _STATUS.search(fatal.decode("utf-8", "replace"))
    status = found.group(1).strip() if found else "no status"
    status = status.split(". ")[0].rstrip(".")[:200]  # its first sentence: the code and what failed
    code = status.split(":")[0].strip()
    me = f"process {process_id} of {num_processes}"
    if process_id != 0 and (code in _UNREACHABLE or "heartbeat" in status.lower()):
        text = f"process 0 (the coordinator at {coordinator}) stopped responding ({status}), so {me} stopped"
    else:
        text = f"JAX's coordination service (process 0, at {coordinator}) ended {me}: {status}"
    text += "; rerun the same command on every host to resume"
    return text + (f" (JAX's report: {report})" if report else "")


class _Forwarding:
    """Forwards the signals named in `FORWARDED` to the child while the block runs (module docstring); one
    that comes before the child runs is sent to it when it does."""

    def __init__(self):
        self._child = None
        self._early: list[int] = []
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_Forwarding":
        for name in FORWARDED:
            number = getattr(signal, name, None)
            if number is not None:
                with contextlib.suppress(ValueError, OSError):  # ValueError: not the main thread
                    self._previous[number] = signal.signal(number, self._forward)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def to(self, child) -> None:
        self._child = child
        for number in self._early:
            self._send(number)

    def _forward(self, number, frame) -> None:
        if signal.Signals(number).name in _FROM_TERMINAL and _owns_terminal():
            return
        if self._child is None:
            self._early.append(number)
        else:
            self._send(number)

    def _send(self, number: int) -> None:
        with contextlib.suppress(OSError):
            self._child.send_signal(number)


def _owns_terminal() -> bool:
    """Whether this process's group is the foreground group of its controlling terminal."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)


def exit_like(returncode: int) -> int:
    """Ends this process as the child ended when a signal killed it (without a core file of its own);
    returns `returncode` otherwise, for the caller to exit with."""
    if returncode >= 0:
        return returncode
    number = -returncode
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    with contextlib.suppress(Exception):
        signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {number})
        os.kill(os.getpid(), number)
        time.sleep(1.0)
    os._exit(128 + number)  # a signal whose default is not to end a process


__all__ = ["DRAIN_S", "HOLD_S", "MARK", "Outcome", "adopt", "available", "command_line", "exit_like", "is_child",
           "run"]
