"""A fork server for the docs check: one process imports what the documented commands import (torch,
transformers, datasets, matplotlib, lorafit) and forks a child for each command the shim hands it, so that a
command does not spend 5-8 s of its few seconds importing them again.

    docs_forkserver.py SOCKET        (started by docs_check.run_blocks with the documents' environment)

The shim sends its standard streams (as file descriptors), its working directory, its environment and what to
run; the child takes them over and runs it as the program would (``lorafit.cli.main``, a script as
``__main__``, a python block); the server answers the child's pid, then its exit status. A command whose
environment differs from the server's (a variable set on the command line, which a library may read at import)
gets pid 0: the shim runs it itself, as a new process. When the shim goes away before its child ends (killed),
the child is killed too.

No thread runs here: a fork copies only the calling thread, so the server waits for children in one loop.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path

# what most documented commands import; a command needing more imports it itself
PRELOAD = ("torch", "transformers", "datasets", "safetensors.torch", "lorafit.cli", "lorafit.train.run",
           "lorafit.train.loop", "lorafit.train.tasks", "transformers.models.llama.modeling_llama",
           "transformers.models.bert.modeling_bert", "lorafit.serve.server")
# what bash or the shim's start changes in a command's environment, which no library reads at import
IGNORED = {"PWD", "OLDPWD", "SHLVL", "_"}


def receive(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the shim went away")
        data += chunk
    return data


def send_request(path: str, request: dict) -> socket.socket:
    """The shim's side: connects, hands over fds 0-2 and ``request``; returns the connection."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    socket.send_fds(conn, [b"r"], [0, 1, 2])
    data = json.dumps(request).encode()
    conn.sendall(len(data).to_bytes(8, "big") + data)
    return conn


def run_child(request: dict, streams: list[int]) -> None:
    """In the forked child: become the command and exit with its status."""
    for target, fd in enumerate(streams):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = list(request["argv"])
    code = 0
    try:
        kind = request["kind"]
        # sys.path[0] as the program's own start sets it (this server's is the shim's directory)
        if kind == "lorafit":
            from lorafit.cli import main

            sys.path[0] = str(Path(sys.argv[0]).parent)
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
    import matplotlib

    matplotlib.use("Agg")  # as lorafit.train.metrics does, before pyplot
    for name in (*PRELOAD, "matplotlib.pyplot"):
        try:
            importlib.import_module(name)
        except ImportError:  # an extra that is not installed: its commands import (and fail) themselves
            pass
    baseline = {k: v for k, v in os.environ.items() if k not in IGNORED}
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
                    _, streams, _, _ = socket.recv_fds(conn, 1, 3)
                    request = json.loads(receive(conn, int.from_bytes(receive(conn, 8), "big")))
                    env = {k: v for k, v in request["env"].items() if k not in IGNORED}
                    if env != baseline:
                        for fd in streams:
                            os.close(fd)
                        conn.sendall((0).to_bytes(8, "big"))
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
                        run_child(request, streams)
                    for fd in streams:
                        os.close(fd)
                    conn.sendall(pid.to_bytes(8, "big"))
                    children[pid] = conn
                    selector.register(conn, selectors.EVENT_READ, pid)
                else:  # the shim closed its end before its child ended: it was killed
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


if __name__ == "__main__":
    serve(sys.argv[1])
