"""Triton's first compilation of each kernel variant in a helper process, while the caller runs torch ops.

With an empty Triton cache, each kernel variant compiles for about half a second on its first launch, so a
first training step with dropout would wait seconds for them. Compiling in a thread of this process does not
help: large parts of Triton's compiler hold the GIL. So on a GPU the first launch of each variant (kernel,
argument dtypes, the divisibility Triton specialises integers on, constexprs) asks a helper process to compile
it (``JITFunction.warmup`` with dtypes for tensors: it allocates and runs nothing), and returns False: the
caller takes the torch ops, which apply the same masks. Once the helper reports a variant done (the kernel and,
where Triton builds one per signature, its C launcher), it loads from Triton's disk cache. The helper starts
on the first request (or ``start()``), once per process, and exits with it.

The cost: until then the products round differently (torch's order of additions, not the kernel's), so two
runs agree to rounding, not bit for bit, in their first steps. ``LORAFIT_TRITON_WARMUP=0`` compiles in the
calling process instead. A helper that fails to start, dies, or takes longer than ``TIMEOUT_S`` for a
variant is given up on (a warning says so) and the kernels compile in the calling process, as without it.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

TIMEOUT_S = 120.0
_INT32 = range(-(1 << 31), 1 << 31)
_lock = threading.Lock()
_ready: set[tuple] = set()  # variants compiled (or to be compiled here)
_pending: dict[int, tuple[tuple, float]] = {}  # request id -> (variant, when asked)
_asked: set[tuple] = set()
_helper: subprocess.Popen | None = None
_replies = b""
_off: str | None = None if os.environ.get("LORAFIT_TRITON_WARMUP", "1") != "0" else "LORAFIT_TRITON_WARMUP=0"


def applies(device: torch.device) -> bool:
    """Whether launches on ``device`` wait for the helper: CUDA only (the interpreter compiles nothing)."""
    return device.type == "cuda"


def start(device: torch.device) -> None:
    """Start the helper for ``device`` now, ahead of the first launch that needs it (a no-op if it runs or is
    switched off): its start-up (importing torch and Triton) then overlaps the caller's own, such as loading
    a model."""
    with _lock:
        if _off is None and _helper is None:
            _start_helper(device)


def ready(kernel: str, args: tuple, constexprs: dict, device: torch.device, wanted: tuple | None = None) -> bool:
    """Whether to launch ``kernel`` with these arguments now; False: it is being compiled, take the torch ops.
    ``wanted``: their ``variant``, where the caller has it already."""
    if _off is not None or not applies(device):
        return True
    wanted = wanted or variant(kernel, args, constexprs)
    if wanted is None or wanted in _ready:
        return True
    with _lock:
        if _off is not None:
            return True
        if wanted not in _asked:
            _ask(wanted, kernel, args, constexprs, device)
        _read_replies()
        return wanted in _ready or _off is not None


def wait() -> None:
    """Block until the helper has compiled every variant asked for so far (for benchmarks that time the
    steady state after a first step); at most until the oldest request is TIMEOUT_S old."""
    while _pending:
        with _lock:
            _read_replies()
        time.sleep(0.01)


def variant(kernel: str, args: tuple, constexprs: dict) -> tuple | None:
    """What Triton compiles a kernel for, or more: tensors' dtypes, integers' divisibility by 16 and equality
    to 1, scalar types, constexpr values (what the helper compiles, and the key of a compiled kernel that
    triton_kernels launches directly). None for a tensor not aligned to 16 bytes: the helper's dtype stand-ins
    are aligned, so such a variant compiles here, and launches through Triton's JIT."""
    spec = []
    for a in args:  # by exact type first: this runs at every launch, mostly over ints and tensors
        kind = type(a)
        if kind is int:
            spec.append((a % 16 == 0, a == 1, a in _INT32))
        elif kind is bool:
            spec.append(a)
        elif kind is torch.Tensor or isinstance(a, torch.Tensor):
            if a.data_ptr() % 16:
                return None
            spec.append(a.dtype)
        elif isinstance(a, int):
            spec.append((a % 16 == 0, a == 1, a in _INT32))
        else:
            spec.append(kind)
    return kernel, tuple(spec), tuple(constexprs.items())


def _ask(variant: tuple, kernel: str, args: tuple, constexprs: dict, device: torch.device) -> None:
    _asked.add(variant)
    if _helper is None and not _start_helper(device):
        return
    request = {"id": len(_asked), "kernel": kernel, "constexprs": constexprs,
               "args": [{"dtype": str(a.dtype).removeprefix("torch.")} if isinstance(a, torch.Tensor) else a
                        for a in args]}
    try:
        _helper.stdin.write((json.dumps(request) + "\n").encode())
        _helper.stdin.flush()
    except OSError as err:
        _give_up(f"the helper stopped: {err}")
        return
    _pending[request["id"]] = (variant, time.monotonic())


def _start_helper(device: torch.device) -> bool:
    global _helper
    try:
        _helper = subprocess.Popen(helper_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, env=_helper_env(device))
        os.set_blocking(_helper.stdout.fileno(), False)  # replies are read as they come, never waited for
    except OSError as err:
        _give_up(f"the helper did not start: {err}")
        return False
    atexit.register(_stop, _helper)
    return True


def _stop(helper: subprocess.Popen) -> None:
    """At exit: a compilation still running is of no use to anyone (Triton writes its cache atomically)."""
    if helper.poll() is None:
        helper.kill()
        helper.wait()


def _helper_env(device: torch.device) -> dict[str, str]:
    """The caller's environment (Triton's cache settings included) with only the caller's GPU visible: the
    helper compiles for that GPU's architecture, and if Triton makes a CUDA context there, it is on the GPU
    the caller uses (under torchrun each process's helper on its own GPU, not all on the first)."""
    env = dict(os.environ)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        visible = env.get("CUDA_VISIBLE_DEVICES")
        ids = [v.strip() for v in visible.split(",")] if visible else None
        env["CUDA_VISIBLE_DEVICES"] = ids[index] if ids and index < len(ids) else str(index)
    return env


def helper_command() -> list[str]:
    """The helper's command line (a function, so that tests can run another helper)."""
    src = str(Path(__file__).resolve().parents[2])  # lorafit's own import root, whatever sys.path the caller has
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {src!r}); "
            "from lorafit.kernels.triton_warmup import main; main()"]


def _read_replies() -> None:
    global _replies
    try:
        chunk = _helper.stdout.read() if _helper is not None else None
    except OSError:
        chunk = None
    if chunk:
        _replies += chunk
    *lines, _replies = _replies.split(b"\n")
    for line in lines:
        try:
            variant, _ = _pending.pop(json.loads(line)["id"], (None, 0.0))
        except (ValueError, KeyError, TypeError):  # not a reply
            continue
        if variant is not None:
            _ready.add(variant)  # a variant the helper could not compile compiles here, and fails here if it must
    if _pending and _helper is not None and _helper.poll() is not None:
        _give_up(f"the helper exited with status {_helper.returncode}")
    elif _pending and time.monotonic() - min(t for _, t in _pending.values()) > TIMEOUT_S:
        _give_up(f"no reply within {TIMEOUT_S:.0f} s")


def _give_up(reason: str) -> None:
    global _off, _helper
    _off = reason
    _pending.clear()
    if _helper is not None:
        _helper.kill()
        _helper.wait()
        _helper = None
    warnings.warn(f"lorafit: Triton kernels compile in this process ({reason})", stacklevel=5)


def main() -> None:
    """The helper: compile each requested variant, one JSON line per request, for the one GPU it sees."""
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever else this process prints goes to stderr: stdout carries the replies only
    from lorafit.kernels import triton_jit

    for line in sys.stdin:
        request = json.loads(line)
        reply = {"id": request["id"]}
        try:
            args = [getattr(torch, a["dtype"]) if isinstance(a, dict) else a for a in request["args"]]
            compiled = getattr(triton_jit, request["kernel"]).warmup(*args, grid=(1,), **request["constexprs"])
            _build_launcher(compiled)
        except Exception as err:  # noqa: BLE001 - any failure: the caller compiles the variant itself
            reply["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        print(json.dumps(reply), file=replies, flush=True)


def _build_launcher(compiled) -> None:
    """The kernel's host-side launcher, where this Triton builds one per signature (a C module compiled on the
    first launch and kept in Triton's cache; newer Triton launches every kernel through one generic function,
    and this costs nothing there). Not needed for the kernel itself, so failures are ignored."""
    from triton.runtime import driver

    try:
        driver.active.launcher_cls(compiled.src, compiled.metadata)
    except Exception:  # noqa: BLE001 - the caller then builds it on its first launch, as without the helper
        pass
