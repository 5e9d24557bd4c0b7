"""Pools of long-lived rank processes that run a function on every rank of a real gloo group.

This module owns ``run_on_ranks``: the way tests execute SPMD code on 1..8 ranks of a real
``torch.distributed`` gloo process group. Starting processes and joining a group is slow next to a
test, so each world size gets a pool of rank processes, created lazily (forked from a forkserver that
has torch imported), initialised once (default group, gloo on loopback, rendezvous through a
TCPStore the caller hosts on 127.0.0.1) and reused by every later call, which then costs one pipe
round trip per rank. A pool whose ranks hung, died or fell out of step is killed and re-created on
the next call, so one broken test does not poison the ones after it.
"""

from __future__ import annotations

import atexit
import collections
import datetime
import multiprocessing
import os
import pickle
import sys
import threading
import time
import traceback
from multiprocessing import connection, get_context

import torch
import torch.distributed as dist

from dtensor_plus import random as dtp_random

__all__ = ["RankError", "run_on_ranks", "shutdown_pools"]

MAX_WORLD_SIZE = 8
_MAX_LIVE_PROCESSES = 16  # pools beyond this many ranks in total are evicted, least recently used first
_STARTUP_TIMEOUT_S = 120.0  # a loaded machine can take a while to start and connect 8 ranks
_FAILURE_GRACE_S = 2.0  # after one rank fails, how long the others get before the pool is killed
_MIN_PG_TIMEOUT_S = 60.0  # gloo's own timeout; a call asking for longer re-creates the pool
_PRELOAD_IF_LOADED = ("numpy", "pytest", "hypothesis", "dtensor_plus")


class RankError(RuntimeError):
    """Some rank raised, died or did not answer in time; the message carries the remote tracebacks."""

    def __init__(self, message: str, failed_ranks: list[int]):
        super().__init__(message)
        self.failed_ranks = failed_ranks


def run_on_ranks(world_size: int, fn, *args, timeout: float = 60.0, **kwargs) -> list:
    """Run fn(*args, **kwargs) on every rank of a world_size-rank gloo group; return the per-rank results in rank order.

    fn, args and kwargs are pickled by reference, so fn must be a module-level function importable
    in the rank processes. ``timeout`` bounds the call itself, not the one-off start of a pool.
    """
    _check_call(world_size, fn, timeout)
    _check_main_guard()
    payload = _pickle_call(fn, args, kwargs)
    pool = _pool_for(world_size, timeout)
    return pool.call(payload, f"run_on_ranks({world_size}, {_describe(fn)})", timeout)


def shutdown_pools() -> None:
    """Kill every pool; the next run_on_ranks call starts a fresh one."""
    while _POOLS:
        _POOLS.popitem()[1].kill()


# ---------------------------------------------------------------- caller side


def _check_call(world_size, fn, timeout) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool):
        raise TypeError(f"world_size must be an int in 1..{MAX_WORLD_SIZE}, got {world_size!r}")
    if not 1 <= world_size <= MAX_WORLD_SIZE:
        raise ValueError(f"world_size must be in 1..{MAX_WORLD_SIZE}, got {world_size}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if not 0 < timeout < float("inf"):
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout!r}")


_GUARD_ADVICE = (
    "the rank processes import the script you ran (multiprocessing starts them that way), so a call at its top "
    "level runs again in each of them: put it under `if __name__ == \"__main__\":` at the end of {script}"
)


def _check_main_guard() -> None:
    """A script that calls run_on_ranks at its top level, with no ``if __name__ == "__main__":``, would make each
    rank call it again while importing the script, and the ranks would die naming nothing; say so instead."""
    if multiprocessing.current_process().name.startswith("dtensor_plus-rank"):
        main = getattr(sys.modules.get("__mp_main__") or sys.modules.get("__main__"), "__file__", "your script")
        raise RuntimeError(f"run_on_ranks was called inside a rank process: {_GUARD_ADVICE.format(script=main)}")
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if not path or not path.endswith(".py") or getattr(main, "__spec__", None) is not None:
        return  # not a script run as `python file.py` (pytest, -m, an interactive session)
    caller = sys._getframe(2)
    try:
        source = open(path, encoding="utf-8").read()
    except OSError:
        return
    if caller.f_globals.get("__name__") == "__main__" and caller.f_code.co_name == "<module>" \
            and "__name__" not in source:
        raise RuntimeError(f"run_on_ranks called at the top level of {path}: {_GUARD_ADVICE.format(script=path)}")


def _describe(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _pickle_call(fn, args, kwargs) -> bytes:
    # Plain pickle (not multiprocessing's ForkingPickler) so tensors travel as bytes, not as
    # shared-memory file descriptors that break when the sender exits or fds run out.
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"run_on_ranks cannot send fn {_describe(fn)} to the rank processes ({exc}); "
            "use a module-level function (not a lambda, closure or nested function)"
        ) from exc
    try:
        return pickle.dumps((fn, args, kwargs))
    except Exception as exc:
        raise TypeError(f"run_on_ranks cannot pickle the arguments for {_describe(fn)}: {exc}") from exc


def _context():
    # Not "fork": forking the caller, which has run torch ops and holds threads, is unsafe. A
    # forkserver is a clean single-threaded process that only imported torch, so each rank starts in
    # tens of ms instead of re-importing torch for seconds as under "spawn". Packages the caller
    # already uses (pytest, hypothesis, ...) are preloaded too: importing them per rank costs more
    # than the whole gloo rendezvous. The preload list takes effect when the server first starts.
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return get_context("spawn")
    ctx = get_context("forkserver")
    preload = [m for m in _PRELOAD_IF_LOADED if m in sys.modules]
    # torch._dynamo: the first meta-tensor op (every dispatch cache miss) imports it via torch._refs;
    # loading it once in the server saves seconds per rank.
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", *preload])
    return ctx


_POOLS: collections.OrderedDict[int, _Pool] = collections.OrderedDict()  # least recently used first


def _pool_for(world_size: int, timeout: float) -> _Pool:
    pool = _POOLS.pop(world_size, None)
    if pool is not None and (not pool.alive() or pool.pg_timeout_s < timeout):
        pool.kill()
        pool = None
    if pool is None:
        while _POOLS and sum(p.world_size for p in _POOLS.values()) + world_size > _MAX_LIVE_PROCESSES:
            _POOLS.popitem(last=False)[1].kill()
        pool = _Pool(world_size, max(timeout, _MIN_PG_TIMEOUT_S))
    _POOLS[world_size] = pool
    return pool


class _Pool:
    """world_size rank processes sharing one initialised default process group."""

    def __init__(self, world_size: int, pg_timeout_s: float):
        self.world_size, self.pg_timeout_s = world_size, pg_timeout_s
        # The caller hosts the rendezvous store so the port is picked by the OS, race free.
        self.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
        self.sent_sys_path = list(sys.path)  # multiprocessing hands the children this sys.path
        self.conns, self.lifelines, self.procs = [], [], []
        try:
            self._start_ranks()
            replies, missing = self._collect(time.monotonic() + _STARTUP_TIMEOUT_S)
        except BaseException:  # KeyboardInterrupt included: do not leak half a pool
            self.kill()
            raise
        if missing or any(r[0] != "ok" for r in replies.values()):
            self.kill()
            message = _failure_message(f"starting the {world_size}-rank pool", replies, missing, _STARTUP_TIMEOUT_S)
            raise RankError(message, _failed_ranks(replies, missing))

    def _start_ranks(self) -> None:
        ctx = _context()
        for rank in range(self.world_size):
            ours, theirs = ctx.Pipe(duplex=True)
            lifeline_theirs, lifeline_ours = ctx.Pipe(duplex=False)
            args = (rank, self.world_size, self.store.port, self.pg_timeout_s, dict(os.environ), theirs, lifeline_theirs)
            name = f"dtensor_plus-rank{rank}of{self.world_size}"
            proc = ctx.Process(target=_rank_main, args=args, name=name, daemon=True)
            proc.start()
            theirs.close()
            lifeline_theirs.close()
            self.conns.append(ours)
            self.lifelines.append(lifeline_ours)
            self.procs.append(proc)

    def call(self, payload: bytes, what: str, timeout: float) -> list:
        sys_path = list(sys.path)
        # Pytest prepends each test module's directory to sys.path; children need it to unpickle fn.
        message = pickle.dumps((sys_path if sys_path != self.sent_sys_path else None, payload))
        self.sent_sys_path = sys_path
        in_step = False
        try:
            for conn in self.conns:
                conn.send_bytes(message)
            replies, missing = self._collect(time.monotonic() + timeout)
            seqs = {reply[2] for reply in replies.values()}
            # Ranks that answered with one collective count (even if some raised) can serve again.
            in_step = not missing and len(seqs) == 1 and None not in seqs
        except OSError:  # a rank died before reading the call
            replies, missing = {}, list(range(self.world_size))
        finally:  # also on KeyboardInterrupt: replies still in flight would answer the next call
            if not in_step:
                _POOLS.pop(self.world_size, None)
                self.kill()
        if in_step and all(reply[0] == "ok" for reply in replies.values()):
            return [replies[rank][1] for rank in range(self.world_size)]
        raise RankError(_failure_message(what, replies, missing, timeout), _failed_ranks(replies, missing))

    def _collect(self, deadline: float) -> tuple[dict[int, tuple], list[int]]:
        """Replies by rank, and the ranks that gave none before the deadline (shortened on failure)."""
        replies, pending = {}, {conn: rank for rank, conn in enumerate(self.conns)}
        while pending and (remaining := deadline - time.monotonic()) > 0:
            for conn in connection.wait(list(pending), timeout=remaining):
                rank = pending.pop(conn)
                replies[rank] = self._receive(rank, conn)
                if replies[rank][0] != "ok":
                    deadline = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
        return replies, sorted(pending.values())

    def _receive(self, rank: int, conn) -> tuple:
        try:
            return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            self.procs[rank].join(timeout=1.0)
            hint = ""
            script = getattr(sys.modules.get("__main__"), "__file__", None)
            if script and getattr(sys.modules["__main__"], "__spec__", None) is None:  # run as `python script.py`
                hint = f"; if it died while starting, check its stderr: {_GUARD_ADVICE.format(script=script)}"
            return ("raised", f"rank process died (exit code {self.procs[rank].exitcode}){hint}\n", None)
        except Exception:
            return ("raised", f"could not unpickle the rank's reply:\n{traceback.format_exc()}", None)

    def alive(self) -> bool:
        return all(proc.is_alive() for proc in self.procs)

    def kill(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc, conn, lifeline in zip(self.procs, self.conns, self.lifelines):
            proc.join(timeout=5.0)
            conn.close()
            lifeline.close()
        self.procs, self.conns, self.lifelines, self.store = [], [], [], None


def _failed_ranks(replies: dict, missing: list[int]) -> list[int]:
    return sorted(missing + [rank for rank, reply in replies.items() if reply[0] != "ok"])


def _failure_message(what: str, replies: dict, missing: list[int], timeout: float) -> str:
    lines = [f"{what} failed on ranks {_failed_ranks(replies, missing)}"]
    for rank in sorted(replies):
        if replies[rank][0] != "ok":
            lines.append(f"--- rank {rank} raised:\n{replies[rank][1].rstrip()}")
    raised = len(lines) > 1
    if missing:
        waited = f"the {_FAILURE_GRACE_S:g} s grace after a rank failed" if raised else f"{timeout:g} s"
        lines.append(f"--- ranks {missing} did not answer within {waited} (hung, or waiting in a collective on "
                     "a failed rank); the pool was killed and the next call starts a fresh one")
    return "\n".join(lines)


atexit.register(shutdown_pools)


# ---------------------------------------------------------------- rank side


def _rank_main(rank: int, world_size: int, port: int, pg_timeout_s: float, env: dict, conn, lifeline) -> None:
    """Entry point of a rank process: join the group, then serve calls until the caller goes away."""
    os.dup2(2, 1)  # rank output goes to the caller's stderr
    # The forkserver's environment dates from its start; ranks see the caller's as of pool start.
    os.environ.clear()
    os.environ.update(env, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")  # gloo on loopback: no network needed
    torch.set_num_threads(1)  # ranks share few cores; intra-op threads would only oversubscribe
    threading.Thread(target=_exit_when_orphaned, args=(lifeline,), daemon=True).start()
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=_STARTUP_TIMEOUT_S))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        conn.send_bytes(pickle.dumps(("ok", None, 0)))
    except BaseException:
        conn.send_bytes(pickle.dumps(("raised", traceback.format_exc(), None)))
        return
    fresh_rng = dtp_random.get_rng_state()
    while True:
        try:
            sys_path, payload = pickle.loads(conn.recv_bytes())
        except EOFError:  # the caller closed the pipe or died
            os._exit(0)
        if sys_path is not None:
            sys.path[:] = sys_path
        # Each call starts from a fresh process's random state: a test that seeded strict mode (or drew numbers)
        # must not change what the next test on this worker draws or which compute path it takes.
        dtp_random.set_rng_state(fresh_rng)
        reply = _serve_one(payload)
        sys.stdout.flush()
        sys.stderr.flush()
        conn.send_bytes(reply)


def _serve_one(payload: bytes) -> bytes:
    try:
        fn, args, kwargs = pickle.loads(payload)
        reply = ("ok", fn(*args, **kwargs))
    except BaseException:
        reply = ("raised", traceback.format_exc())
    # The default group's collective count lets the caller tell whether ranks are still in step.
    seq = dist.group.WORLD._get_sequence_number_for_group() if dist.is_initialized() else None
    if seq is None and reply[0] == "ok":
        reply = ("raised", "fn destroyed the default process group; run_on_ranks needs it kept\n")
    try:
        return pickle.dumps((*reply, seq))
    except Exception:
        return pickle.dumps(("raised", f"could not pickle the result:\n{traceback.format_exc()}", seq))


def _exit_when_orphaned(lifeline) -> None:
    # daemon=True only covers a clean caller exit; a killed caller would leave ranks stuck in fn.
    # The caller never writes to the lifeline: EOF means it closed it or died.
    try:
        lifeline.recv_bytes()
    finally:
        os._exit(1)
