"""Many processes, one job: the process group behind `--coordinator`, `--num-processes`, `--process-id`.

`connect(...)` returns a `LocalGroup` (one process: every collective is the identity) or a `ProcessGroup`
(N processes, typically one per host, joined through `jax.distributed`). Both have the same methods, so
the jobs call them unconditionally:

* ``index``, ``count``, ``is_leader``: this process's place; process 0 (the leader) writes the outputs.
* ``sum(array)``: the float64 sum of every process's array, bitwise identical on every process.
* ``total(n)``, ``broadcast(bytes)``, ``gather(bytes)``: integer sums and byte messages.
* ``shared_key(seed)``: the run's root key, the same on every process (`featdp.randomness`).
* ``releaser(inner, first_row, block_rows)``: a releaser whose statistics are summed over processes
  before `inner` adds the noise, and whose Poisson masks are those of the global row blocks.
* ``row_range(n, align)``: this process's contiguous share of n rows.
* ``fail(message)`` / ``finish()``: how a job ends (see "Failures" below); the group is a context manager
  that calls one of them.

Joining. Before JAX is touched, every process says hello to process 0 on the coordinator's port (one line
of JSON over TCP: its --process-id, its --num-processes, and a digest per option of the command it runs);
process 0 waits for the N − 1 others and answers all of them at once. So a coordinator that cannot be
reached, a process started with another --num-processes, two processes with the same --process-id, or
processes running different commands (another --out, --seed, backbone, …) each stop with one message
naming the value, within the timeout, instead of JAX's own behaviour (a wait until its timeout, then a
fatal abort with a C++ stack trace). Then process 0 closes its listener and the port is handed to
`jax.distributed.initialize`. With no flags, JAX's own cluster detection (Slurm, Open MPI, Cloud TPU
pods, Kubernetes) supplies the address, the count and the id.

Collectives. Sums run as XLA all-reduces over one CPU device per process (gloo TCP collectives: JAX's CPU
client joins the process group whatever the accelerator), in float64 under a scoped `enable_x64`, so
statistics stay float64 end to end and every process gets the same bits (each element of an all-reduce
is computed once and copied). The summation order differs from a single process's sequential sum, so a
summed statistic differs from the one-process value by float64 rounding (~1e-16 relative); the release
then rounds it to its noise grid (`featdp.mechanism`), so a head equals the one-process head bitwise
unless a coordinate lies within that rounding of a half-grid point.

The network between the hosts is inside the trust boundary: the all-reduced sums are the clean
statistics, so broadcasting the root key of an unseeded run (drawn by process 0 from the OS) over it
exposes nothing the sums do not.

Failures. Every collective is preceded by a status exchange: a fixed-size all-gather of a flag and a short
text per process (the coming operation and its shape, or an error). A process whose job raises calls
`fail(message)`, which takes part in one status exchange with its message; the others are at their next
collective (at the latest the `finish()` every job ends with), see the failure there, and stop with
"process i of N failed: …". A process that dies (killed, out of memory) breaks the TCP connections of the
collectives: the others' next collective fails at once and they stop with a message saying so (JAX's
recoverable mode keeps its coordination service from aborting the survivors when heartbeats stop). A dead
*coordinator* (process 0) takes the coordination service with it, and JAX itself then terminates the
others with its own fatal error (SIGABRT): the CLI runs each process of a group under a supervisor
(`featdp_cli.supervise`) that turns that into one `error:` line, but a library caller of `connect` gets
JAX's abort. Either way nothing is half-written: a fit's outputs are written by
process 0 at the end, as one unit, and an extraction's parts resume from their `rows_done`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import secrets
import socket
import struct
import threading
import time
from typing import Any, Iterable, Iterator

import numpy as np

from featdp.randomness import KEY_BYTES, RootKey, make_key

DEFAULT_TIMEOUT_S = 300.0  # JAX's own initialization timeout
_HELLO_LIMIT = 1 << 16  # bytes of one handshake message
_STATUS_BYTES = 1024  # flag (1) + length (4) + text
_OK, _FAILED = 1, 2
_RETRY_S = 0.25
_LINGER_S = 20.0  # how long process 0 waits for the others to disconnect at the end
_LINGER_LOST_S = 3.0  # the same, after a process was lost


class DistributedError(ValueError):
    """Bad process-group arguments, a coordinator that cannot be reached, disagreeing processes, or a
    failure on another process; the message names the value or the process."""


class PeerFailure(DistributedError):
    """A failure every process has seen (another process's, or a broken connection): this process stops
    without taking part in more collectives."""


# --- the arguments ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """Where this process stands: `coordinator` "HOST:PORT", `num_processes`, `process_id`."""

    coordinator: str
    num_processes: int
    process_id: int
    detected: str = ""  # the cluster environment that supplied some of them ("" : all were flags)


def parse_address(text: str) -> tuple[str, int]:
    """'HOST:PORT' or '[IPv6]:PORT' -> (host, port); DistributedError naming the value otherwise."""
    host, sep, port = str(text).rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedError(f"--coordinator must be HOST:PORT with a port in [1, 65535], got {text!r}")
    return host, int(port)


def resolve(coordinator: str | None, num_processes: int | None, process_id: int | None) -> Spec | None:
    """The process-group arguments, completed by JAX's cluster detection where some are not given; None
    for a single process. Flags win over detection; `--num-processes 1` forces a single process."""
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num-processes must be >= 1, got {num_processes}")
    if num_processes == 1:
        if process_id not in (None, 0):
            raise DistributedError(f"--process-id must lie in [0, 1) for --num-processes 1, got {process_id}")
        return None
    if process_id is not None and (process_id < 0 or (num_processes is not None and process_id >= num_processes)):
        raise DistributedError(f"--process-id must lie in [0, {num_processes or 'N'}), got {process_id}")
    if None in (coordinator, num_processes, process_id):
        detected = _detect_cluster(coordinator, num_processes, process_id)
        if detected is None:
            if coordinator is None and num_processes is None and process_id is None:
                return None  # no flags, no cluster: one process
            given = ", ".join(
                f"{flag} {value}" for flag, value in (("--coordinator", coordinator),
                                                      ("--num-processes", num_processes),
                                                      ("--process-id", process_id)) if value is not None
            )
            raise DistributedError(
                f"{given}: a process group needs all of --coordinator HOST:PORT, --num-processes N and "
                "--process-id I (or a Slurm, Open MPI or Cloud TPU environment that supplies them)"
            )
        coordinator, num_processes, process_id, source = detected
    else:
        source = ""
    if num_processes == 1:
        return None
    if not isinstance(process_id, int) or not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id must lie in [0, {num_processes}), got {process_id}")
    parse_address(coordinator)
    return Spec(str(coordinator), int(num_processes), int(process_id), source)


# The environments JAX detects that featdp joins without flags. Not Kubernetes: a single featdp process
# in a pod (a CI runner, say) must not turn into a process group, nor query the cluster's API.
_DETECTED = ("SlurmCluster", "OmpiCluster", "GceTpuCluster", "GkeTpuCluster")


def _detect_cluster(coordinator, num_processes, process_id):
    """JAX's cluster detection (the `ClusterEnv` that `jax.distributed.initialize()` uses without
    arguments; private, hence looked up defensively) for the values not given, and the environment's
    name; None without a cluster."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:
        return None
    env = next((e for e in ClusterEnv._cluster_types if e.__name__ in _DETECTED and e.is_env_present()), None)
    if env is None:
        return None
    if coordinator is None:
        coordinator = env.get_coordinator_address(timeout_secs=int(DEFAULT_TIMEOUT_S),
                                                  override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))
    return (coordinator,
            num_processes if num_processes is not None else env.get_process_count(),
            process_id if process_id is not None else env.get_process_id(), env.__name__)


def job_digest(job: dict[str, Any]) -> dict[str, str]:
    """A digest per option of a command, so that the handshake can name an option on which processes
    disagree without sending its value."""
    return {
        str(key): hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
        for key, value in job.items()
    }


def row_range(num_rows: int, index: int, count: int, align: int = 1) -> tuple[int, int]:
    """Rows [start, stop) of process `index` of `count`: contiguous, balanced to within `align` rows, each
    starting at a multiple of `align`; together they cover [0, num_rows) exactly once."""
    if align < 1:
        raise ValueError(f"align={align} must be >= 1")
    blocks = -(-int(num_rows) // align)
    first, last = index * blocks // count, (index + 1) * blocks // count
    return min(first * align, num_rows), min(last * align, num_rows)


# --- one process ----------------------------------------------------------------------------------------


class LocalGroup:
    """The group of one process: every collective returns its input."""

    index = 0
    count = 1
    is_leader = True
    session = ""
    summed_bytes = 0  # nothing leaves the process

    def __repr__(self) -> str:
        return "LocalGroup()"

    def sum(self, array) -> np.ndarray:
        return np.array(array, dtype=np.float64)

    def total(self, value: int) -> int:
        return int(value)

    def broadcast(self, data: bytes) -> bytes:
        return bytes(data)

    def gather(self, data: bytes) -> list[bytes]:
        return [bytes(data)]

    def shared_key(self, seed: int | None) -> RootKey:
        return make_key(seed)

    def releaser(self, inner, first_row: int, block_rows: int):
        return inner

    def row_range(self, num_rows: int, align: int = 1) -> tuple[int, int]:
        return row_range(num_rows, 0, 1, align)

    def fail(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        _leave(self, error)


LOCAL = LocalGroup()


def _leave(group, error: BaseException | None) -> None:
    """Leaving a group's `with` block: finish, or report this process's failure to the others (a
    PeerFailure was seen by every process already); then leave the group."""
    try:
        if error is None:
            group.finish()
        elif not isinstance(error, PeerFailure):
            text = str(error) or type(error).__name__
            group.fail(text if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {text}")
    finally:
        group.close()


# --- many processes -------------------------------------------------------------------------------------


def connect(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    job: dict[str, Any] | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> LocalGroup | ProcessGroup:
    """The process group for these arguments (`resolve`), joined; `LOCAL` for one process.

    `job` describes the command (its options); every process must run the same. Use the result as a
    context manager: leaving it normally calls `finish()`, leaving it with an exception `fail()`."""
    if not timeout > 0:
        raise DistributedError(f"the coordinator timeout must be > 0 seconds, got {timeout}")
    spec = resolve(coordinator, num_processes, process_id)
    if spec is None:
        return LOCAL
    deadline = time.monotonic() + timeout
    hello = {"featdp": 1, "process_id": spec.process_id, "num_processes": spec.num_processes,
             "job": job_digest(job or {})}
    host, port = parse_address(spec.coordinator)
    try:
        if spec.process_id == 0:
            session = _lead(port, spec, hello, deadline, timeout)
        else:
            session = _join(host, port, spec, hello, deadline, timeout)
    except DistributedError as error:
        if not spec.detected:
            raise
        raise DistributedError(
            f"{error} (process {spec.process_id} of {spec.num_processes} at {spec.coordinator}, as JAX's "
            f"{spec.detected} detection found them; --num-processes 1 runs this process alone)"
        ) from None
    return ProcessGroup(spec, session, deadline)


def _listen(port: int) -> socket.socket:
    try:  # every interface, IPv6 and IPv4, as JAX's own service binds
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    except (OSError, ValueError):
        pass
    try:
        return socket.create_server(("", port))
    except OSError as error:
        raise DistributedError(
            f"--coordinator port {port}: process 0 cannot listen on it ({error.strerror or error}); is another "
            "process 0 running, or another program using the port?"
        ) from None


def _lead(port: int, spec: Spec, hello: dict, deadline: float, timeout: float) -> str:
    """Process 0: collect a hello from each other process, check them, answer all at once."""
    server = _listen(port)
    peers: dict[int, socket.socket] = {}
    problem = None
    try:
        server.settimeout(_RETRY_S)
        while len(peers) < spec.num_processes - 1 and problem is None:
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, spec.num_processes)) - set(peers))
                problem = (f"only {len(peers) + 1} of --num-processes {spec.num_processes} processes joined the "
                           f"coordinator within {timeout:g} s; missing --process-id {', '.join(map(str, missing))}")
                break
            try:
                conn, _ = server.accept()
            except (socket.timeout, BlockingIOError, InterruptedError):
                continue
            try:
                theirs = _receive(conn, min(deadline, time.monotonic() + 10))
            except (OSError, ValueError):
                conn.close()  # not a featdp process (a port scan, a stale client): ignore it
                continue
            problem = _disagreement(hello, theirs, peers)
            # A process that disagrees is answered too (with the problem), under a key no process id uses.
            peers[theirs["process_id"] if problem is None else -1 - len(peers)] = conn
        session = secrets.token_hex(16)
        for conn in peers.values():
            with contextlib.suppress(OSError):
                _send(conn, {"ok": problem is None, "session": session, "error": problem})
        # Let the others close first, so that this side of the port is not left in TIME_WAIT.
        for conn in peers.values():
            with contextlib.suppress(OSError, ValueError):
                conn.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
                conn.recv(1)
    finally:
        for conn in peers.values():
            conn.close()
        server.close()
    if problem is not None:
        raise DistributedError(problem)
    return session


def _disagreement(mine: dict, theirs: Any, peers: dict) -> str | None:
    if not isinstance(theirs, dict) or theirs.get("featdp") != mine["featdp"]:
        return f"a process that does not speak featdp's handshake joined the coordinator: {str(theirs)[:80]!r}"
    pid, count = theirs.get("process_id"), theirs.get("num_processes")
    if count != mine["num_processes"]:
        return (f"process {pid} was started with --num-processes {count}, process 0 with --num-processes "
                f"{mine['num_processes']}; every process must be given the same")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < count:
        return f"a process joined with --process-id {pid}, outside [1, {count})"
    if pid in peers:
        return f"two processes were started with --process-id {pid}"
    job, their_job = mine["job"], theirs.get("job") if isinstance(theirs.get("job"), dict) else {}
    if their_job != job:
        keys = sorted(k for k in set(job) | set(their_job) if job.get(k) != their_job.get(k))
        return (f"process {pid} runs a different command from process 0 (they differ in "
                f"{', '.join(map(str, keys[:6]))}); every process must be given the same options")
    return None


def _join(host: str, port: int, spec: Spec, hello: dict, deadline: float, timeout: float) -> str:
    """Process i > 0: connect to process 0 (retrying until the deadline), say hello, read the answer."""
    while True:
        try:
            conn = socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            break
        except socket.gaierror as error:
            raise DistributedError(
                f"--coordinator {spec.coordinator}: cannot resolve host {host!r} ({error})") from None
        except OSError as error:
            if time.monotonic() + _RETRY_S > deadline:
                reason = error.strerror or str(error) or type(error).__name__
                raise DistributedError(
                    f"cannot reach the coordinator {spec.coordinator} within {timeout:g} s ({reason}); is process 0 "
                    "running, and is this its address?"
                ) from None
            time.sleep(_RETRY_S)
    try:
        _send(conn, hello)
        answer = _receive(conn, deadline)
    except (OSError, ValueError) as error:
        raise DistributedError(
            f"the coordinator {spec.coordinator} did not answer as featdp's process 0 within {timeout:g} s "
            f"({error or type(error).__name__})"
        ) from None
    finally:
        conn.close()
    if not isinstance(answer, dict) or not isinstance(answer.get("session"), str):
        raise DistributedError(f"{spec.coordinator} is not featdp's process 0: it answered {str(answer)[:80]!r}")
    if not answer.get("ok"):
        raise DistributedError(str(answer.get("error")))
    return answer["session"]


def _send(conn: socket.socket, message: dict) -> None:
    conn.sendall(json.dumps(message).encode() + b"\n")


def _receive(conn: socket.socket, deadline: float) -> Any:
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("timed out")
        conn.settimeout(remaining)
        chunk = conn.recv(4096)
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
        if len(data) > _HELLO_LIMIT:
            raise ValueError("message too long")
    return json.loads(data)


class ProcessGroup:
    """N processes joined by `jax.distributed` (module docstring). Create it with `connect`."""

    def __init__(self, spec: Spec, session: str, deadline: float):
        import jax

        self.index, self.count = spec.process_id, spec.num_processes
        self.is_leader = self.index == 0
        self.session = session
        self._closed = self._lost = False
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            # Without it, the coordination service aborts every process once one stops sending heartbeats;
            # with it, the survivors see the broken collective and stop with a message (module docstring).
            jax.config.update("jax_enable_recoverability", True)
            jax.distributed.initialize(
                spec.coordinator, spec.num_processes, spec.process_id,
                initialization_timeout=max(1, math.ceil(deadline - time.monotonic())),
            )
        except (RuntimeError, ValueError) as error:
            raise DistributedError(f"joining the process group at {spec.coordinator} failed: {error}") from None
        if jax.process_count() != self.count or jax.process_index() != self.index:
            raise DistributedError(
                f"JAX sees process {jax.process_index()} of {jax.process_count()}, featdp was told "
                f"--process-id {self.index} --num-processes {self.count}"
            )
        firsts: dict[int, Any] = {}
        for device in jax.devices("cpu"):
            firsts.setdefault(device.process_index, device)
        if sorted(firsts) != list(range(self.count)):
            raise DistributedError(f"JAX's CPU client spans processes {sorted(firsts)}, expected 0..{self.count - 1}")
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.array([firsts[i] for i in range(self.count)]), ("process",))
        self._stacked = NamedSharding(mesh, PartitionSpec("process"))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._programs: dict = {}
        self.summed_bytes = 0  # payload of every `sum` so far (benchmarks/scale_out.py checks its cost model)

    def __repr__(self) -> str:
        return f"ProcessGroup(process {self.index} of {self.count})"

    # -- collectives ----------------------------------------------------------------------------------

    def _program(self, kind: str):
        if kind not in self._programs:
            import jax

            function = (lambda stacked: stacked.sum(axis=0)) if kind == "sum" else (lambda stacked: stacked)
            self._programs[kind] = jax.jit(function, out_shardings=self._replicated)
        return self._programs[kind]

    def _collective(self, kind: str, local: np.ndarray) -> np.ndarray:
        """`local` stacked over processes, then summed ("sum") or gathered ("gather"), on every process."""
        import jax

        try:
            with jax.enable_x64(True):
                stacked = jax.make_array_from_process_local_data(self._stacked, local[None])
                return np.asarray(self._program(kind)(stacked).addressable_data(0))
        except Exception as error:  # gloo's errors surface as XlaRuntimeError or ValueError, by version
            self._closed = self._lost = True
            raise PeerFailure(
                f"process {self.index} of {self.count} lost contact with the other processes ({_first_line(error)}): "
                "one of them was stopped or crashed; restart every process to resume"
            ) from None

    def _exchange(self, flag: int, text: str) -> None:
        """The status exchange before every collective (module docstring, "Failures"). `text` is this
        process's error, or the coming operation and its shape, which every process must agree on (a
        mismatch is a bug in featdp, reported rather than left to deadlock)."""
        if self._closed:
            raise PeerFailure(f"process {self.index} of {self.count}: the process group has ended")
        body = text.encode("utf-8", "replace")[: _STATUS_BYTES - 5]
        status = np.zeros(_STATUS_BYTES, np.uint8)
        status[0] = flag
        status[1:5] = np.frombuffer(struct.pack("<I", len(body)), np.uint8)
        status[5 : 5 + len(body)] = np.frombuffer(body, np.uint8)
        everyone = self._collective("gather", status)
        lengths = [struct.unpack("<I", everyone[i, 1:5].tobytes())[0] for i in range(self.count)]
        texts = [everyone[i, 5 : 5 + lengths[i]].tobytes().decode("utf-8", "replace") for i in range(self.count)]
        failed = [i for i in range(self.count) if everyone[i, 0] != _OK]
        if failed:
            self._closed = True
            if self.index in failed:  # this process's own failure, now known to all
                raise PeerFailure(texts[self.index])
            first = failed[0]
            also = f" (and process {', '.join(map(str, failed[1:]))})" if len(failed) > 1 else ""
            raise PeerFailure(f"process {first} of {self.count} failed{also}: {texts[first]}")
        if len(set(texts)) > 1:
            self._closed = True
            steps = "; ".join(f"process {i}: {t}" for i, t in enumerate(texts))
            raise PeerFailure(f"the processes are out of step ({steps})")

    def sum(self, array) -> np.ndarray:
        array = np.ascontiguousarray(array, dtype=np.float64)
        self._exchange(_OK, f"sum {array.shape}")
        self.summed_bytes += array.nbytes
        return self._collective("sum", array).astype(np.float64, copy=False)

    def total(self, value: int) -> int:
        # float64 holds every integer below 2^53 exactly: far beyond any row count.
        return int(self.sum(np.array([float(value)]))[0])

    def gather(self, data: bytes) -> list[bytes]:
        self._exchange(_OK, "gather")
        lengths = self._collective("gather", np.array([len(data)], np.int64))[:, 0]
        padded = np.zeros(int(lengths.max()), np.uint8)
        padded[: len(data)] = np.frombuffer(bytes(data), np.uint8)
        everyone = self._collective("gather", padded)
        return [everyone[i, : int(lengths[i])].tobytes() for i in range(self.count)]

    def broadcast(self, data: bytes) -> bytes:
        return self.gather(bytes(data) if self.is_leader else b"")[0]

    def shared_key(self, seed: int | None) -> RootKey:
        """Seeded: every process derives the key from the seed (the handshake checked that all were given
        the same). Unseeded: process 0's key from the OS, broadcast whole (256 bits)."""
        if seed is not None:
            return make_key(seed)
        material = self.broadcast(RootKey.from_os().material if self.is_leader else b"")
        if len(material) != KEY_BYTES:
            raise DistributedError(f"process 0 broadcast a key of {len(material)} bytes, expected {KEY_BYTES}")
        return RootKey(material, seeded=False)

    def releaser(self, inner, first_row: int, block_rows: int) -> SummingReleaser:
        return SummingReleaser(inner, self, first_row, block_rows)

    def row_range(self, num_rows: int, align: int = 1) -> tuple[int, int]:
        return row_range(num_rows, self.index, self.count, align)

    # -- the end ----------------------------------------------------------------------------------------

    def fail(self, message: str) -> None:
        """Tells the others that this process failed with `message` (one status exchange); never raises."""
        if not self._closed:
            with contextlib.suppress(DistributedError):
                self._exchange(_FAILED, message)
        self._closed = True

    def finish(self) -> None:
        """The last collective of a job; PeerFailure if any process failed."""
        self._exchange(_OK, "finish")
        self._closed = True

    def close(self) -> None:
        """Leaves `jax.distributed` in order: the others disconnect first, process 0 (whose coordination
        service they talk to) last. A process whose service vanishes under it is aborted by JAX, so the
        leader waits (at most `_LINGER_S`) until the others are gone before it shuts the service down."""
        import jax
        from jax._src import distributed as jax_distributed

        self._closed = True
        client = jax_distributed.global_state.client
        if client is None:
            return
        if self.is_leader:
            others_gone = threading.Thread(target=_wait_for_others, args=(client, self.count), daemon=True)
            others_gone.start()
            # After a lost connection, a dead process is only declared gone at JAX's heartbeat timeout.
            others_gone.join(_LINGER_LOST_S if self._lost else _LINGER_S)
        with contextlib.suppress(Exception):
            jax.distributed.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> None:
        _leave(self, error)


def _wait_for_others(client, count: int) -> None:
    # In recoverable mode the coordination service answers GetAliveTasks once every task still connected
    # has asked too, or disconnected: with the others shutting down, that is when they are gone.
    with contextlib.suppress(Exception):
        client.get_live_nodes(list(range(count)))


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[0] if lines else type(error).__name__)[:200]


class SummingReleaser:
    """The releaser of one process of a group: each statistic it is handed is this process's partial sum;
    it is summed over the processes (`group.sum`) and released once by `inner`, which adds the noise.
    Every process holds the same key, so every process adds the same noise to the same sum.

    Poisson masks are those of global row blocks: this process's rows start at global row `first_row`, a
    multiple of `block_rows`, so its local block b is global block first_row / block_rows + b, holds the
    same rows, and gets the mask a single process draws for that block."""

    def __init__(self, inner, group: ProcessGroup, first_row: int, block_rows: int):
        if first_row % block_rows:
            raise ValueError(f"first_row={first_row} is not a multiple of block_rows={block_rows}")
        self.inner, self.group = inner, group
        self.first_block = first_row // block_rows

    @property
    def releases(self):
        return self.inner.releases

    def release(self, name: str, value: np.ndarray, **options) -> np.ndarray:
        return self.inner.release(name, self.group.sum(value), **options)

    def release_stack(self, name: str, values: Iterable[np.ndarray], shape: tuple[int, ...],
                      **options) -> Iterator[np.ndarray]:
        return self.inner.release_stack(name, (self.group.sum(value) for value in values), shape, **options)

    def poisson_mask(self, step: int, block: int, rows: int, probability: float) -> np.ndarray:
        return self.inner.poisson_mask(step, self.first_block + block, rows, probability)


__all__ = ["DEFAULT_TIMEOUT_S", "DistributedError", "LOCAL", "LocalGroup", "PeerFailure", "ProcessGroup", "Spec",
           "SummingReleaser", "connect", "job_digest", "parse_address", "resolve", "row_range"]
