"""Multi-process training through torchrun on CPU (gloo): DDP and FSDP end where one process ends.

Each test launches ``torchrun --standalone --nproc-per-node 2 ... lorafit train`` on a
tiny random BERT, as a user would, and compares the adapter with a
one-process run of the same config (same global batch, same seed). The workers are
forks of a server that imported lorafit's modules once (tests/forkserver.py), except
in the killed-run test, which starts them as ``-m lorafit`` (as do the README's
torchrun commands in the docs check). LoRA dropout
is 0 here: with dropout the processes draw their own masks, so the runs are
equally valid but not bitwise comparable.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.forkserver import started
from tests.test_train_support import classification_setup, instruction_setup

transformers = pytest.importorskip("transformers")

from lorafit.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
FORKSERVER = REPO / "tests" / "forkserver.py"


@pytest.fixture(scope="module", autouse=True)
def forkserver():
    """A server that has imported torch, transformers and lorafit, whose forks the workers are
    (tests/forkserver.py): most of a tiny run's time in a new worker process was those imports."""
    with started(ENV) as env:
        ENV["FORKSERVER"] = env["FORKSERVER"]
        yield
    del ENV["FORKSERVER"]


def torchrun(config: Path, out: Path, *extra: str, nproc: int = 2, forked: bool = True,
             **popen) -> subprocess.Popen:
    """``torchrun -m lorafit train``; with ``forked``, each worker a fork of the fork server."""
    worker = ["--no-python", sys.executable, str(FORKSERVER), "lorafit"] if forked else ["-m", "lorafit"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *worker,
           "train", str(config), "--output-dir", str(out), "--no-progress", *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def descendants(pid: int) -> list[int]:
    """Child processes, from /proc (torchrun starts its workers in process groups of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]
    return output


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, atol: float = 1e-5) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=0, msg=key)
    assert json.loads((a / "adapter" / "adapter_config.json").read_text()) == \
        json.loads((b / "adapter" / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """49 rows in global batches of 8 with accumulation 2: the last micro-batch has one row, so one
    process has none and must still join the gradient sync.

    adam_eps = 1e-5: summing a gradient in two halves instead of one rounds differently (~1e-7), and for a
    coordinate whose gradient is nearly zero (a dead GELU unit feeding an adapter) Adam's g / sqrt(v)
    blows that rounding up to a visible step (3.7e-5 was seen with the default 1e-8); a larger eps keeps
    such coordinates still, so the comparison tests the distributed step, not Adam's noise gain."""
    root = tmp_path_factory.mktemp("dist")
    config = classification_setup(root, n_train=49, extra="grad_accum = 2\nsave_every = 2\nadam_eps = 1e-5\n")
    config.write_text(config.read_text().replace("epochs = 12", "epochs = 3").replace("eval_every = 12",
                                                                                      "eval_every = 4"))
    one = root / "one"
    train(config, [f"output_dir={json.dumps(str(one))}"], progress=False)
    return config, one


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_end_with_the_one_process_adapter(setup, tmp_path, mode):
    config, one = setup
    two = tmp_path / mode
    output = finish(torchrun(config, two, "--set", f"train.distributed={mode}"))
    assert f"2 processes ({mode}, gloo)" in output
    assert_same_adapter(one, two)
    # one output directory, written once: one checkpoint, RNG states of both processes in it
    steps = sorted(p.name for p in (two / "checkpoints").glob("step-*"))
    assert steps == [f"step-{json.loads((one / 'summary.json').read_text())['steps']:07d}"]
    assert {p.name for p in (two / "checkpoints" / steps[0]).glob("rng*.safetensors")} == \
        {"rng.safetensors", "rng-rank1.safetensors"}
    assert not list(two.rglob("*.tmp*"))
    s1, s2 = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert s2["processes"] == 2 and s2["distributed"] == mode and s1["processes"] == 1
    assert s2["validation"]["accuracy"] == pytest.approx(s1["validation"]["accuracy"])
    assert s2["validation"]["eval_loss"] == pytest.approx(s1["validation"]["eval_loss"], abs=1e-5)
    assert s2["best"]["step"] == s1["best"]["step"]
    # metrics are reduced across processes: the loss and token counts of the whole global batch
    train_lines = [[r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                    if r["type"] == "train"] for run in (one, two)]
    assert [r["step"] for r in train_lines[0]] == [r["step"] for r in train_lines[1]]
    for r1, r2 in zip(*train_lines):
        assert r2["loss"] == pytest.approx(r1["loss"], abs=1e-5)
    assert s2["train_tokens"] == s1["train_tokens"]
    assert "Warning" not in output, output  # e.g. a deprecated DDP argument, warned once per process
    if mode == "ddp":
        # only the adapter's gradients travel: 4 bytes per trainable parameter per step, not the model
        assert s2["gradient_bytes_all_reduced_per_step"] == 4 * s1["params"]["trainable"]
        assert s1["params"]["trainable"] < s1["params"]["total"] / 5


def test_compiled_blocks_under_fsdp_end_with_the_one_process_adapter(setup, tmp_path):
    """train.compile with FSDP: the blocks (BERT names none in _no_split_modules: its list of layers) are
    compiled before sharding; aot_eager runs the traced graphs with eager kernels, so the two processes end
    where the uncompiled one-process run ends."""
    config, one = setup
    two = tmp_path / "fsdp-compiled"
    output = finish(torchrun(config, two, "--set", "train.distributed=fsdp", "--set", "train.compile=true",
                             "--set", "train.compile_backend=aot_eager"))
    assert "2 processes (fsdp, gloo)" in output
    assert_same_adapter(one, two)


def test_loraplus_rates_under_fsdp(setup, tmp_path):
    """LoRA+ (B at 16 x lr): the optimizer is built after FSDP replaced the parameters by shards, its groups found
    through the adapted layers (which then hold the shards); the run ends with the one-process LoRA+ adapter.
    (DDP keeps the parameters themselves, so its groups are the one-process run's.)"""
    config, plain = setup
    one, two = tmp_path / "one", tmp_path / "fsdp"
    train(config, [f"output_dir={json.dumps(str(one))}", "train.loraplus_lr_ratio=16"], progress=False)
    finish(torchrun(config, two, "--set", "train.distributed=fsdp", "--set", "train.loraplus_lr_ratio=16"))
    # B steps 16 x as far, and so does the rounding of the gradients' sums in two halves (see setup): 16 x atol
    assert_same_adapter(one, two, atol=16e-5)
    b = [k for k in adapter(one) if ".lora_B." in k]
    moved = [(adapter(one)[k] - adapter(plain)[k]).abs().max() for k in b]
    assert b and min(moved) > 0.1  # the ratio changed every B far more than that
    assert "loraplus_lr_ratio = 16.0" in (two / "config.toml").read_text()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_lorafa_under_two_processes(setup, tmp_path, mode):
    """LoRA-FA: under DDP each process projects the whole all-reduced gradient of B (A, frozen before DDP wraps
    the model, is no DDP parameter); under FSDP each projects its rows of it with (A A^T)^-1 of the whole A
    (gathered from the shards). Both end with the one-process LoRA-FA adapter."""
    config, plain = setup
    one, two = tmp_path / "one", tmp_path / mode
    train(config, [f"output_dir={json.dumps(str(one))}", "train.lorafa=true"], progress=False)
    finish(torchrun(config, two, "--set", f"train.distributed={mode}", "--set", "train.lorafa=true"))
    assert_same_adapter(one, two)
    b_moved = [(adapter(one)[k] - adapter(plain)[k]).abs().max() for k in adapter(one) if ".lora_B." in k]
    assert min(b_moved) > 1e-3


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_causal_lm_loss_positions_only_under_two_processes(tmp_path, mode):
    """The causal-LM loss runs the model's head itself, outside the forward: DDP must still sync its gradients
    (the forward goes through the wrapper); under FSDP the model's own head computes the loss positions."""
    config = instruction_setup(tmp_path, 32, 8, output_dir="one",
                               lora='r = 8\nlora_alpha = 16\ntarget_modules = "all-linear"',
                               train="epochs = 2\nbatch_size = 8\nlr = 3e-2\neval_every = 4\nnum_threads = 1\n"
                                     "adam_eps = 1e-5")
    train(config, progress=False)
    finish(torchrun(config, tmp_path / mode, "--set", f"train.distributed={mode}"))
    assert_same_adapter(tmp_path / "one", tmp_path / mode, atol=1e-4)
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", mode))
    assert s2["validation"]["eval_loss"] == pytest.approx(s1["validation"]["eval_loss"], abs=1e-5)


@pytest.mark.parametrize("mode, precompute", [("ddp", False), ("fsdp", False), ("fsdp", True)])
def test_dpo_under_two_processes(tmp_path, mode, precompute):
    """DPO runs the model twice a step, the second time without gradients and with the adapter switched off
    (the reference model): through DDP's wrapper, and FSDP's sharded layers, the run ends where one process
    does. With task.precompute_reference each process computes half the examples' reference before the model is
    sharded, and both get all of them."""
    from tests.test_train_preference import preference_setup

    config = preference_setup(tmp_path, n_train=32, n_val=8)
    args = ["train.epochs=2", "train.adam_eps=1e-5", f"task.precompute_reference={str(precompute).lower()}",
            f"output_dir={json.dumps(str(tmp_path / 'one'))}"]
    train(config, args, progress=False)
    finish(torchrun(config, tmp_path / mode, *(x for a in args[:3] for x in ("--set", a)),
                    "--set", f"train.distributed={mode}"))
    assert_same_adapter(tmp_path / "one", tmp_path / mode, atol=1e-4)
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", mode))
    for key in ("eval_loss", "reward_margin"):
        assert s2["validation"][key] == pytest.approx(s1["validation"][key], abs=1e-4), key


def test_a_reward_model_under_two_processes(tmp_path):
    """A reward model (a one-output classifier and its new score head, trained with the adapter) under DDP ends
    where one process does, its evaluation summed over both processes' pairs."""
    from tests.test_train_reward import reward_setup

    config = reward_setup(tmp_path, n_train=32, n_val=9)
    args = ["train.epochs=2", "train.adam_eps=1e-5", "task.reward_centering=0.01",
            f"output_dir={json.dumps(str(tmp_path / 'one'))}"]
    train(config, args, progress=False)
    finish(torchrun(config, tmp_path / "ddp", *(x for a in args[:3] for x in ("--set", a))))
    assert_same_adapter(tmp_path / "one", tmp_path / "ddp", atol=1e-4)
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("one", "ddp"))
    for key in ("eval_loss", "accuracy", "reward_margin"):
        assert s2["validation"][key] == pytest.approx(s1["validation"][key], abs=1e-4), key


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_kto_under_two_processes(tmp_path, mode):
    """KTO runs the model four times a step through DDP's wrapper or FSDP's sharded layers (once with gradients).
    Its KL estimate is each process's own (as in TRL), so the run does not end exactly where one process does: the
    adapter is the same one up to that (its factors point the same way, with the same size)."""
    from tests.test_train_kto import kto_setup

    config = kto_setup(tmp_path, n_train=32, n_val=8)
    args = ["train.epochs=2", "train.adam_eps=1e-5", f"output_dir={json.dumps(str(tmp_path / 'one'))}"]
    train(config, args, progress=False)
    finish(torchrun(config, tmp_path / mode, *(x for a in args[:2] for x in ("--set", a)),
                    "--set", f"train.distributed={mode}"))
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / mode)
    assert one.keys() == two.keys()
    a, b = (torch.cat([t[k].flatten() for k in sorted(t) if "lora_B" in k]) for t in (one, two))
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99 and 0.95 < b.norm() / a.norm() < 1.05
    s2 = json.loads((tmp_path / mode / "summary.json").read_text())
    assert all(math.isfinite(v) for v in s2["validation"].values())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_expert_weight_adapters_under_two_processes(tmp_path, mode):
    """target_parameters on a Mixtral's expert stacks: the sums formed again in backward come from the weights
    and factors FSDP gathers again for it, and both modes end with the one-process adapter."""
    config = instruction_setup(tmp_path, 32, 8, output_dir="one",
                               lora='r = 4\nlora_alpha = 8\ntarget_modules = ["q_proj"]\n'
                                    'target_parameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]',
                               train="epochs = 2\nbatch_size = 8\nlr = 3e-2\nnum_threads = 1\nadam_eps = 1e-5")
    from tests.test_target_parameters import mixtral_for

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny-llama")
    mixtral_for(tok, initializer_range=0.2).save_pretrained(tmp_path / "tiny-mixtral")
    tok.save_pretrained(tmp_path / "tiny-mixtral")
    config.write_text(config.read_text().replace(str(tmp_path / "tiny-llama"), str(tmp_path / "tiny-mixtral")))
    train(config, progress=False)
    finish(torchrun(config, tmp_path / mode, "--set", f"train.distributed={mode}"))
    assert any("experts.base_layer.lora_A" in k for k in adapter(tmp_path / mode))
    assert_same_adapter(tmp_path / "one", tmp_path / mode, atol=1e-4)


def test_fsdp_shards_bfloat16_weights_beside_float32_adapters(tmp_path):
    """train.bf16 on bfloat16 weights trains float32 adapters: FSDP shards blocks holding both dtypes."""
    config = instruction_setup(tmp_path, 32, 8, lora='r = 8\nlora_alpha = 16\ntarget_modules = "all-linear"',
                               train="epochs = 1\nbatch_size = 8\nlr = 3e-2\nnum_threads = 1")
    finish(torchrun(config, tmp_path / "fsdp", "--set", "train.distributed=fsdp", "--set", "model.dtype=bfloat16",
                    "--set", "train.bf16=true"))
    tensors = adapter(tmp_path / "fsdp")
    assert tensors and all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_bfloat16_adapters_step_on_float32_masters_under_two_processes(tmp_path, mode):
    """bfloat16 adapters keep float32 masters in every process (FSDP: sharded like their parameters); the
    checkpoint holds the whole masters, near the one-process run's (the gradients' sums round differently in
    bfloat16, by an ulp here and there), and the model's parameters are their rounding."""
    config = instruction_setup(tmp_path, 32, 8, lora='r = 8\nlora_alpha = 16\ntarget_modules = "all-linear"',
                               train="epochs = 1\nbatch_size = 8\nlr = 1e-3\nnum_threads = 1")
    train(config, ["model.dtype=bfloat16", f"output_dir={json.dumps(str(tmp_path / 'one'))}"], progress=False)
    finish(torchrun(config, tmp_path / mode, "--set", f"train.distributed={mode}", "--set", "model.dtype=bfloat16"))
    saved = load_file(tmp_path / mode / "checkpoints" / "step-0000004" / "trainable.safetensors")
    one = load_file(tmp_path / "one" / "checkpoints" / "step-0000004" / "trainable.safetensors")
    assert saved.keys() == one.keys() and all(t.dtype == torch.float32 for t in saved.values())
    for key in saved:
        torch.testing.assert_close(saved[key], one[key], atol=2e-3, rtol=0, msg=key)
    # the saved adapter (the model's parameters, gathered) is the masters' rounding: the steps reached the model
    tensors = adapter(tmp_path / mode)
    assert tensors.keys() == {"base_model.model." + k.replace(".default", ".weight") for k in saved}
    for key, value in saved.items():
        assert torch.equal(tensors["base_model.model." + key.replace(".default", ".weight")], value.bfloat16()), key


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_killed_distributed_run_resumes_to_the_uninterrupted_result(setup, tmp_path, mode):
    config, one = setup
    run = tmp_path / "killed"
    proc = torchrun(config, run, "--set", f"train.distributed={mode}", forked=False)  # the workers: its children
    pointer = run / "checkpoints" / "latest.json"
    deadline = time.time() + 120
    while not pointer.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun and both workers, mid-run
        os.kill(pid, signal.SIGKILL)
    proc.communicate()
    if (run / "summary.json").is_file():
        pytest.skip("the run finished before it could be killed (machine too fast for this test)")
    assert pointer.is_file(), "no checkpoint was written before the deadline"
    output = finish(torchrun(config, run, "--resume", "--set", f"train.distributed={mode}"))
    assert "resuming from" in output and "step-" in output
    assert_same_adapter(one, run)


def test_the_global_batch_must_cover_every_process(tmp_path):
    from lorafit.train.config import load_config
    from lorafit.train.distributed import Distributed
    from lorafit.train.run import _train

    config = load_config(classification_setup(tmp_path), ["train.batch_size=3"])
    with pytest.raises(ValueError, match=r"train.batch_size = 3 is the global batch .* processes \(4\)"):
        _train(config, Distributed(rank=0, world_size=4), None, 0.0, resume=False, overwrite=False, model=None,
               tokenizer=None, callbacks=(), progress=False)
    assert not (tmp_path / "run").exists()


def test_launch_instructions_are_in_the_help():
    from lorafit.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "torchrun --nproc-per-node N -m lorafit train CONFIG.toml" in text
    assert "--nnodes M" in text and "--rdzv-endpoint" in text and "train.distributed=fsdp" in text


@pytest.mark.parametrize("reward, extra, steps", [
    ("great", [], 32),
    ("great", ["task.scale_rewards='batch'", "task.grpo_loss=dapo", "task.num_iterations=2", "train.epochs=2"], 32),
    ("great_logged", ["task.log_completions=true", "task.top_entropy_quantile=0.5"], 32)])
def test_grpo_under_two_processes(tmp_path, reward, extra, steps):
    """GRPO samples in each process from DDP's model (its own prompts), scores and all-reduces the gradients of
    the sampled completions; evaluation shares the prompts out and sums the rewards. The reward rises as in one
    process; also with the advantages scaled by all the processes' rewards, the loss over all their tokens and
    two steps on each batch of samples. A metric that one process's reward function logs is averaged over what
    was logged, and completions.jsonl holds every process's completions; the entropy quantile of
    task.top_entropy_quantile is over every process's tokens."""
    from lorafit.train import evaluate
    from tests.test_train_grpo import grpo_setup

    config, settings = grpo_setup(tmp_path, reward, extra=extra)
    finish(torchrun(config, tmp_path / "ddp", *(x for s in settings for x in ("--set", s))))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    base = evaluate(tmp_path / "ddp", base=True)
    assert summary["validation"]["reward"] > base["reward"] + 0.3, (summary["validation"], base)
    logged = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["type"] == "train" and "reward" in r] == list(range(2, steps + 1, 2))
    if reward == "great_logged":
        assert all(r["main_only"] == 1.0 and r["everywhere"] == 2.0 for r in logged if "reward" in r)
        assert summary["validation"]["main_only"] == 1.0 and summary["validation"]["everywhere"] == 2.0
        lines = [json.loads(line) for line in (tmp_path / "ddp" / "completions.jsonl").read_text().splitlines()]
        samples = [r for r in lines if r["split"] == "train"]
        assert [r["step"] for r in samples] == [step for step in range(1, steps + 1) for _ in range(16)]
        assert len([r for r in lines if r["split"] == "validation"]) == 4 * 8  # every process's prompts
        assert all(r["chars"] == len(r["completion"]) for r in samples)


def _gather_worker(rank: int, port: int, out: Path) -> None:
    from lorafit.train.distributed import Distributed

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        mine = torch.arange(3 - 2 * rank, dtype=torch.float32) + 10 * rank  # 3 values, then 1
        (out / f"{rank}.json").write_text(json.dumps(Distributed(rank, 2).gather_cat(mine).tolist()))
    finally:
        torch.distributed.destroy_process_group()


def test_gather_cat_joins_every_process_s_values_of_any_length(tmp_path):
    """What task.top_entropy_quantile's quantile is taken over: each process's tokens, however many."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_gather_worker, args=(port, tmp_path), nprocs=2, start_method="fork")
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [0.0, 1.0, 2.0, 10.0]
