"""The Triton warm-up helper: a launch whose kernel variant is not compiled yet returns to the torch ops while a
helper process compiles it, and launches once the helper reports it done; a helper that dies or does not
answer is given up on (the kernels then compile in the calling process). On CPUs with a stand-in helper and
stand-in kernels; the real helper compiling for a real launch is a CUDA test."""

import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch

import lorafit.kernels
from lorafit.kernels import mask, triton_kernels, triton_warmup

# reads requests, logs them to LOG, and answers each once the file GO exists (DIE: exits at the first request)
FAKE_HELPER = textwrap.dedent("""
    import json, os, sys, time
    log, go, die = sys.argv[1:4]
    for line in sys.stdin:
        if die == "1":
            sys.exit(3)
        with open(log, "a") as fh:
            fh.write(line)
        while not os.path.exists(go):
            time.sleep(0.01)
        print(json.dumps({"id": json.loads(line)["id"]}), flush=True)
""")


def _fresh_warmup(monkeypatch) -> None:
    """The warm-up on, for CPU tensors too, with nothing asked, compiled or running."""
    monkeypatch.setattr(triton_warmup, "applies", lambda device: True)
    monkeypatch.setattr(triton_warmup, "_off", None)
    for name, value in {"_ready": set(), "_pending": {}, "_asked": set(), "_helper": None, "_replies": b""}.items():
        monkeypatch.setattr(triton_warmup, name, value)


@pytest.fixture
def helper(monkeypatch, tmp_path):
    """A fresh warm-up with a stand-in helper; yields (requests log, go file, die switch)."""
    log, go = tmp_path / "requests.jsonl", tmp_path / "go"
    die = {"value": "0"}
    _fresh_warmup(monkeypatch)
    monkeypatch.setattr(triton_warmup, "helper_command",
                        lambda: [sys.executable, "-c", FAKE_HELPER, str(log), str(go), die["value"]])
    yield log, go, die
    if triton_warmup._helper is not None:
        triton_warmup._helper.kill()
        triton_warmup._helper.wait()


def _until(condition, seconds: float = 20.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return False


def _requests(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_variant_is_compiled_by_the_helper_once_then_launched(helper):
    log, go, _ = helper
    cpu = torch.device("cpu")
    x = torch.zeros(8, 32, dtype=torch.bfloat16)
    args, constexprs = (x, torch.zeros(4, 32), 48, 7, 2.5), {"BM": 64, "PRECISION": "tf32"}
    assert not triton_warmup.ready("_down_kernel", args, constexprs, cpu)
    assert not triton_warmup.ready("_down_kernel", (x, torch.zeros(4, 32), 32, 5, 0.5), constexprs, cpu)  # same variant
    assert _until(lambda: len(_requests(log)) == 1)
    (request,) = _requests(log)
    assert request["kernel"] == "_down_kernel" and request["constexprs"] == constexprs
    assert request["args"] == [{"dtype": "bfloat16"}, {"dtype": "float32"}, 48, 7, 2.5]
    go.touch()
    assert _until(lambda: triton_warmup.ready("_down_kernel", args, constexprs, cpu))
    # another dtype, another divisibility by 16, another constexpr: each a variant of its own
    for other in [((x.float(), *args[1:]), constexprs), ((x, args[1], 49, 7, 2.5), constexprs),
                  (args, dict(constexprs, BM=32))]:
        assert _until(lambda: triton_warmup.ready("_down_kernel", *other, cpu))
    assert len(_requests(log)) == 4
    assert triton_warmup._pending == {}


def test_launchers_return_to_the_torch_ops_until_the_helper_is_done(helper, monkeypatch):
    """run() gives None (take the torch ops, the kernels stay enabled) while the variant compiles, then the
    kernel's result; a direct call (wait=True) launches at once."""
    _, go, _ = helper
    launches = []

    class Kernel:  # stands in for triton_jit._down_kernel: computes what the kernel would
        def __getitem__(self, grid):
            def launch(x, a, h, key, t, m, k, r, sx, sa, **constexprs):
                launches.append(grid)
                h.copy_((mask.dropped(x, key, t) if constexprs["MASKED"] else x) @ a.T)
            return launch

    stand_in = types.SimpleNamespace(_down_kernel=Kernel())
    monkeypatch.setitem(sys.modules, "lorafit.kernels.triton_jit", stand_in)
    monkeypatch.setattr(lorafit.kernels, "triton_jit", stand_in, raising=False)  # if an earlier test imported it
    monkeypatch.setattr(triton_kernels, "_unavailable", None)
    x, a = torch.randn(40, 32), torch.randn(4, 32)
    key, (t, _) = torch.tensor(7, dtype=torch.int32), mask.threshold(0.1)
    want = mask.dropped(x, key, t) @ a.T
    assert triton_kernels.run(triton_kernels.down, x, a, key, t) is None and not launches
    go.touch()
    assert _until(lambda: triton_kernels.run(triton_kernels.down, x, a, key, t) is not None)
    torch.testing.assert_close(triton_kernels.run(triton_kernels.down, x, a, key, t), want)
    assert triton_kernels._unavailable is None  # not ready yet is no failure: the kernels stay enabled
    torch.testing.assert_close(triton_kernels.down(x[:, :16], a[:, :16]), x[:, :16] @ a[:, :16].T)


def test_a_helper_that_dies_is_given_up_on(helper):
    _, _, die = helper
    die["value"] = "1"
    cpu = torch.device("cpu")
    args = (torch.zeros(4, 4), 16)
    assert not triton_warmup.ready("_up_kernel", args, {}, cpu)
    with pytest.warns(UserWarning, match="compile in this process.*exited with status 3"):
        assert _until(lambda: triton_warmup.ready("_up_kernel", args, {}, cpu))
    assert triton_warmup._helper is None
    assert triton_warmup.ready("_grad_a_kernel", args, {}, cpu)  # from now on nothing waits


def test_a_helper_that_does_not_answer_is_given_up_on(helper, monkeypatch):
    monkeypatch.setattr(triton_warmup, "TIMEOUT_S", 0.2)
    cpu = torch.device("cpu")
    args = (torch.zeros(4, 4), 16)
    assert not triton_warmup.ready("_up_kernel", args, {}, cpu)
    with pytest.warns(UserWarning, match="no reply within"):
        triton_warmup.wait()  # returns, having given up
    assert triton_warmup.ready("_up_kernel", args, {}, cpu) and not triton_warmup._pending


def test_misaligned_tensors_and_the_switch_skip_the_helper(helper, monkeypatch):
    log, _, _ = helper
    cpu = torch.device("cpu")
    odd = torch.zeros(33)[1:]  # 4 bytes past an aligned start
    assert triton_warmup.ready("_up_kernel", (odd, 16), {}, cpu)
    monkeypatch.setattr(triton_warmup, "_off", "LORAFIT_TRITON_WARMUP=0")
    assert triton_warmup.ready("_up_kernel", (torch.zeros(4), 16), {}, cpu)
    assert triton_warmup._helper is None and not _requests(log)


def test_the_real_helper_answers_each_request(monkeypatch, tmp_path):
    """lorafit's own helper command: it starts from any working directory, reads requests and answers each (on a
    machine without a GPU the answer is an error, and the caller then compiles the variant itself)."""
    _fresh_warmup(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    args = (torch.zeros(64, 64, dtype=torch.bfloat16), torch.zeros(64, 64, dtype=torch.bfloat16), 0.5, 64)
    constexprs = {"BM": 16, "BK": 64}
    cpu = torch.device("cpu")
    try:
        assert not triton_warmup.ready("_mask_scale_kernel", args, constexprs, cpu)
        assert _until(lambda: triton_warmup.ready("_mask_scale_kernel", args, constexprs, cpu), 120)
        assert triton_warmup._off is None and triton_warmup._helper.poll() is None  # still serving
    finally:
        if triton_warmup._helper is not None:
            triton_warmup._helper.kill()
            triton_warmup._helper.wait()


# Under Triton's interpreter, with the accelerator implementation on CPU tensors: a LoRA layer with dropout
# trains through the torch ops while its kernels "compile", then through the kernels, with the same masks.
SWITCH_PROBE = textwrap.dedent("""
    import copy, os, sys, time, torch
    import lorafit
    from lorafit.kernels import cpu, linear, triton_jit, triton_warmup
    go = sys.argv[1]
    linear.cpu_path = cpu.serves = lambda x: False
    triton_warmup.applies = lambda device: True
    triton_warmup._off = None
    triton_warmup.helper_command = lambda: [sys.executable, "-c", (
        "import json, os, sys, time\\n"
        "for line in sys.stdin:\\n"
        "    while not os.path.exists(%r): time.sleep(0.01)\\n"
        "    print(json.dumps({'id': json.loads(line)['id']}), flush=True)") % go]
    launched = []
    for name in ("_down_kernel", "_grad_a_up_kernel"):
        kernel = getattr(triton_jit, name)
        def spy(grid, kernel=kernel, name=name):
            launched.append(name)
            return kernel[grid]
        setattr(triton_jit, name, type("Spy", (), {"__getitem__": lambda self, grid, spy=spy: spy(grid)})())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40))
    lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"]))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p)
    x = torch.randn(2, 16, 48)

    def step():
        model.zero_grad()
        torch.manual_seed(1)
        xi = x.clone().requires_grad_(True)
        y = model(xi)
        y.square().sum().backward()
        return [y.detach(), xi.grad] + [p.grad for p in model.parameters() if p.requires_grad]

    before = step()
    assert not launched, launched
    # the torch ops that stand in meanwhile ask for no kernel of their own (mask_scale, grad_a, up): the helper
    # compiles only what the later steps launch
    asked = sorted({variant[0] for variant in triton_warmup._asked})
    assert asked == ["_down_kernel", "_grad_a_up_kernel"], asked
    open(go, "w").close()
    end = time.monotonic() + 60
    while triton_warmup._pending or triton_warmup._helper is None:
        assert time.monotonic() < end
        time.sleep(0.05)
        with triton_warmup._lock:
            triton_warmup._read_replies()
    after = step()
    after = step()  # the backward of the first step after the reply may have asked for more
    assert "_down_kernel" in launched and "_grad_a_up_kernel" in launched, launched
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    print("switch checks passed")
""")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="already interpreted")
def test_a_layer_gives_the_same_results_before_and_after_its_kernels_are_ready(tmp_path):
    pytest.importorskip("triton")
    root = Path(__file__).parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]))
    done = subprocess.run([sys.executable, "-c", SWITCH_PROBE, str(tmp_path / "go")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "switch checks passed" in done.stdout


# Run in a fresh process with an empty Triton cache: the first launch goes to the torch ops at once, the helper
# compiles, and the launch that follows adds nothing to the cache (it loads what the helper compiled).
REAL_HELPER_PROBE = textwrap.dedent("""
    import os, time, torch
    from lorafit.kernels import mask, triton_kernels, triton_warmup
    cache = os.environ["TRITON_CACHE_DIR"]
    x = torch.randn(300, 512, dtype=torch.bfloat16, device="cuda")
    a = torch.randn(16, 512, dtype=torch.bfloat16, device="cuda")
    key, (t, _) = mask.new_key(x.device), mask.threshold(0.05)
    free = torch.cuda.mem_get_info()[0]
    start = time.perf_counter()
    assert triton_kernels.run(triton_kernels.down, x, a, key, t) is None
    first = time.perf_counter() - start
    assert first < 0.5, first
    while triton_warmup._pending:
        assert time.perf_counter() - start < 120, "no reply from the helper"
        time.sleep(0.05)
        with triton_warmup._lock:
            triton_warmup._read_replies()
    helper_mib = (free - torch.cuda.mem_get_info()[0]) / 2**20  # device-wide: the helper's context, if it made one
    files = sorted(os.listdir(cache))
    h = triton_kernels.run(triton_kernels.down, x, a, key, t)
    assert h is not None and sorted(os.listdir(cache)) == files, "the launch compiled again"
    torch.testing.assert_close(h.float(), (mask.dropped(x, key, t) @ a.T).float(), rtol=2e-2, atol=2e-2)
    print(f"first call {first:.3f} s, compiled by the helper after {time.perf_counter() - start:.1f} s, "
          f"GPU memory taken meanwhile {helper_mib:.0f} MiB")
""")


def test_the_cuda_probe_is_a_valid_script():
    """The probe below runs on a GPU only; its syntax is checked everywhere."""
    compile(REAL_HELPER_PROBE, "REAL_HELPER_PROBE", "exec")


@pytest.mark.cuda
def test_the_helper_compiles_what_the_launch_then_loads(tmp_path):
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "LORAFIT_TRITON_WARMUP": "1"}
    proc = subprocess.run([sys.executable, "-c", REAL_HELPER_PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(proc.stdout)


def test_start_runs_the_helper_before_any_request(helper):
    log, go, _ = helper
    triton_warmup.start(torch.device("cpu"))
    first = triton_warmup._helper
    assert first is not None and first.poll() is None
    triton_warmup.start(torch.device("cpu"))  # already running: the same one
    assert triton_warmup._helper is first
    go.touch()
    cpu = torch.device("cpu")
    assert not triton_warmup.ready("_up_kernel", (torch.zeros(4), 16), {}, cpu)
    assert _until(lambda: triton_warmup.ready("_up_kernel", (torch.zeros(4), 16), {}, cpu))
    assert triton_warmup._helper is first and len(_requests(log)) == 1


def test_the_helper_sees_only_the_callers_gpu(monkeypatch):
    """Under torchrun each process's helper compiles on (and, if Triton makes a context, sits on) its own GPU."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert triton_warmup._helper_env(torch.device("cuda", 3))["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4, GPU-5d1e,6")
    env = triton_warmup._helper_env(torch.device("cuda", 1))
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-5d1e" and env["PATH"] == os.environ["PATH"]
    assert triton_warmup._helper_env(torch.device("cpu"))["CUDA_VISIBLE_DEVICES"] == "4, GPU-5d1e,6"
