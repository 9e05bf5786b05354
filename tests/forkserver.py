"""A fork server for the tests that run lorafit as a program (the docs check, the torchrun tests): one process
imports what those programs import (torch, transformers, datasets, matplotlib, lorafit) and forks a child for
each command a client hands it, so that a command does not spend 5-8 s of its few seconds importing them again.

    forkserver.py serve SOCKET          the server, started with the environment its commands will have
    forkserver.py lorafit ARG...        ``python -m lorafit ARG...`` through the server named by $FORKSERVER
                                        (a torchrun worker: ``torchrun --no-python python forkserver.py ...``)

The client sends its standard streams (as file descriptors), its working directory, its environment and what to
run; the child takes them over and runs it as the program would (``lorafit.cli.main``, a script as
``__main__``, a docs python block); the server answers the child's pid, then its exit status, and the client
exits with it, passing on the signals it gets. A command whose environment differs from the server's (a
variable set on the command line, which a library may read at import) gets pid 0: the client runs it itself,
as a new process, and so it does while the server is still importing. Only the variables torchrun gives its
workers may be added. When a client goes away before its child ends (killed), the child is killed too.

No thread runs in the server: a fork copies only the calling thread, so it waits for children in one loop.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

# what most documented commands import; a command needing more imports it itself
PRELOAD = ("torch", "transformers", "datasets", "safetensors.torch", "lorafit.cli", "lorafit.train.run",
           "lorafit.train.loop", "lorafit.train.tasks", "transformers.models.llama.modeling_llama",
           "transformers.models.bert.modeling_bert", "lorafit.serve.server")
# what bash or the shim's start changes in a command's environment, which no library reads at import
IGNORED = {"PWD", "OLDPWD", "SHLVL", "_"}
# what torchrun adds to a worker's environment (torch.distributed reads it when the process group starts)
LAUNCHER = {"RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "LOCAL_WORLD_SIZE", "WORLD_SIZE",
            "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


def same_environment(env: dict[str, str], baseline: dict[str, str]) -> bool:
    """Whether a command with ``env`` may run in a child of a server started with ``baseline``."""
    changed = {k for k in env.keys() | baseline.keys() if env.get(k) != baseline.get(k)} - IGNORED
    return all(k not in baseline and (k in LAUNCHER or k.startswith("TORCHELASTIC_")) for k in changed)


@contextlib.contextmanager
def started(env: dict[str, str], cwd=None, log=subprocess.DEVNULL) -> Iterator[dict[str, str]]:
    """A server for commands with environment ``env`` while the block runs; yields ``env`` with $FORKSERVER
    naming it (its clients run as new processes until it has imported)."""
    with tempfile.TemporaryDirectory(prefix="fork-") as sockets:  # short: a socket's path has 107 bytes at most
        env = {**env, "FORKSERVER": os.path.join(sockets, "fork")}
        server = subprocess.Popen([sys.executable, __file__, "serve", env["FORKSERVER"]], cwd=cwd, env=env,
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            yield env
        finally:
            server.terminate()
            server.wait(timeout=60)


def receive(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the other end closed the connection")
        data += chunk
    return data


def send_request(path: str, request: dict) -> socket.socket:
    """The client's side: connects, hands over fds 0-2 and ``request``; returns the connection."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [b"r"], [0, 1, 2])
    data = json.dumps(request).encode()
    conn.sendall(len(data).to_bytes(8, "big") + data)
    return conn


def forked(request: dict) -> None:
    """Runs ``request`` in a child of the server named by $FORKSERVER and exits with its status; returns where
    there is no server (yet) or it leaves the command to this process."""
    path = os.environ.get("FORKSERVER")
    if not path:
        return
    try:
        conn = send_request(path, {**request, "cwd": os.getcwd(), "env": dict(os.environ)})
    except (FileNotFoundError, ConnectionRefusedError):  # the server is still importing
        return
    pid = int.from_bytes(receive(conn, 8), "big")
    if not pid:
        conn.close()
        return
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # a block's trap or torchrun stopping a worker
        signal.signal(sig, lambda number, _: os.kill(pid, number))
    try:
        code = int.from_bytes(receive(conn, 8), "big", signed=True)
    except ConnectionError:
        sys.exit(f"forkserver: the server went away while running {' '.join(request['argv'])}")
    sys.exit(code if code >= 0 else 128 - code)


def run_child(request: dict, streams: list[int], added: dict[str, str]) -> None:
    """In the forked child: become the command (its environment plus what the server's imports ``added``) and
    exit with its status."""
    for target, fd in enumerate(streams):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**added, **request["env"]})
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = list(request["argv"])
    code = 0
    try:
        kind = request["kind"]
        # sys.path[0] as the program's own start sets it (this server's is the tests' directory)
        if kind == "lorafit":
            from lorafit.cli import main

            sys.path[0] = request["path0"]
            code = main(sys.argv[1:])
        elif kind == "script":
            sys.path[0] = str(Path(sys.argv[0]).resolve().parent)
            runpy.run_path(sys.argv[0], run_name="__main__")
        elif kind == "block":
            import docs_shim

            docs_shim.python_block(request["code"])
        else:
            raise ValueError(f"unknown kind {kind!r}")
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    try:  # what an interpreter does on the way out: join the threads the command left running, run atexit
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def serve(path: str) -> None:
    baseline = dict(os.environ)  # the commands' environment; imports add to it (inductor: its cache directory)
    import matplotlib

    matplotlib.use("Agg")  # as lorafit.train.metrics does, before pyplot
    for name in (*PRELOAD, "matplotlib.pyplot"):
        try:
            importlib.import_module(name)
        except ImportError:  # an extra that is not installed: its commands import (and fail) themselves
            pass
    added = {k: v for k, v in os.environ.items() if baseline.get(k) != v}  # what a new process's imports add too
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            for key, _ in selector.select(timeout=0.1):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    streams: list[int] = []
                    try:
                        _, streams, _, _ = socket.recv_fds(conn, 1, 3)
                        request = json.loads(receive(conn, int.from_bytes(receive(conn, 8), "big")))
                        if len(streams) != 3 or not same_environment(request["env"], baseline):
                            conn.sendall((0).to_bytes(8, "big"))  # the client runs it itself
                            raise ConnectionAbortedError
                    except (OSError, ValueError):  # also a client gone before it finished asking
                        for fd in streams:
                            os.close(fd)
                        conn.close()
                        continue
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                    if pid == 0:
                        listener.close()
                        conn.close()
                        for other in children.values():
                            other.close()
                        run_child(request, streams, added)
                    for fd in streams:
                        os.close(fd)
                    children[pid] = conn
                    try:
                        conn.sendall(pid.to_bytes(8, "big"))
                        selector.register(conn, selectors.EVENT_READ, pid)
                    except OSError:  # the client has gone: so does its child
                        os.kill(pid, signal.SIGKILL)
                else:  # the client closed its end before its child ended: it was killed
                    try:
                        os.kill(key.data, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    selector.unregister(key.fileobj)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if not pid:
                    break
                conn = children.pop(pid)
                try:
                    selector.unregister(conn)
                except KeyError:  # unregistered when its shim went away
                    pass
                try:
                    conn.sendall(os.waitstatus_to_exitcode(status).to_bytes(8, "big", signed=True))
                except OSError:
                    pass
                conn.close()
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.unlink(path)


def main() -> None:
    if sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif sys.argv[1] == "lorafit":
        args = sys.argv[2:]
        forked({"kind": "lorafit", "argv": ["lorafit", *args], "path0": os.getcwd()})  # as `python -m` sets it
        os.execv(sys.executable, [sys.executable, "-m", "lorafit", *args])
    else:
        sys.exit(f"usage: {sys.argv[0]} serve SOCKET | lorafit ARG...")


if __name__ == "__main__":
    main()
