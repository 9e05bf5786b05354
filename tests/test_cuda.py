"""LoRA on a CUDA GPU (skipped without one): the fused training path against the plain formula and PEFT in
float32 and bfloat16, repeatable dropout, masks equal to the CPU's, and torch.compile."""

import copy

import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig
from lorafit.kernels import mask
from tests.models import rows_alone
from tests.test_fused_linear import _compare, _layer, check_autocast

pytestmark = pytest.mark.cuda
DEVICE = "cuda"  # a dry run of these tests on the CPU: set it to "cpu" and call the functions


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("rows", [5, 4096])
def test_training_path_matches_formula_on_cuda(dtype, dropout, rows):
    model = _layer(nn.Linear(96, 160), [("a", 8), ("b", 16)], dtype, dropout).to(DEVICE)
    _compare(model, torch.randn(rows // 5 or 1, 5, 96, dtype=dtype, device=DEVICE), dropout, dtype)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_autocast_runs_the_fused_path_on_cuda(dropout, bias):
    check_autocast(DEVICE, dropout, bias)


def _llama(dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).to(DEVICE, dtype)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_weights_same_logits_and_gradients_as_peft_on_cuda(dtype):
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    base = _llama(dtype)
    ours = copy.deepcopy(base)
    lorafit.attach(ours, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False))
    theirs = get_peft_model(copy.deepcopy(base), PeftConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                           init_lora_weights=False))
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:
                p.copy_(mine[name.replace("base_model.model.", "").removesuffix(".weight")])
    ids = torch.randint(0, 256, (4, 64), device=DEVICE)
    out_ours, out_theirs = ours(ids, labels=ids), theirs(ids, labels=ids)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    torch.testing.assert_close(out_ours.logits.float(), out_theirs.logits.float(), **tol)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    theirs_grads = {n.replace("base_model.model.", "").removesuffix(".weight"): p.grad
                    for n, p in theirs.named_parameters() if "lora_" in n}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            want = theirs_grads[name]
            scale = want.abs().max().item()
            torch.testing.assert_close(p.grad.float(), want.float(), atol=tol["atol"] * max(scale, 1e-3),
                                       rtol=tol["rtol"] * 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_is_repeatable_in_every_dtype(dtype):
    """The same seed gives the same masks, run after run (bf16 was not, through the old compiled masks)."""
    runs = []
    for _ in range(3):
        model = _llama(torch.float32 if dtype == torch.float16 else dtype)
        if dtype == torch.float16:
            model.half()
        lorafit.attach(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.2, target_modules=TARGETS,
                                         init_lora_weights=False))
        model.train()
        torch.manual_seed(42)
        ids = torch.randint(0, 256, (2, 32), device=DEVICE)
        out = model(ids, labels=ids)
        out.loss.backward()
        runs.append((out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    for logits, grads in runs[1:]:
        assert torch.equal(logits, runs[0][0])
        assert all(torch.equal(a, b) for a, b in zip(grads, runs[0][1]))


def test_cuda_masks_equal_the_cpu_masks():
    """One key, one mask: the Triton kernels on the GPU, the C kernels and the eager ops on the CPU."""
    t, scale = mask.threshold(0.3)
    key = torch.tensor(-424242, dtype=torch.int32)
    x = torch.randn(300, 1000)
    on_cpu = mask.dropped(x, key, t)
    on_gpu = mask.dropped(x.to(DEVICE), key.to(DEVICE), t)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    hashed = lorafit.HashedDropout(0.3).train()  # the model's own dropout, swapped in: the same masks
    torch.manual_seed(3)
    got = hashed(x.to(DEVICE)).cpu()
    torch.manual_seed(3)
    key_drawn = mask.new_key(torch.device(DEVICE)).cpu()  # the draw HashedDropout made from that seed
    assert torch.equal(got, torch.where(mask.keep_mask(300, 1000, key_drawn, t), x * scale, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inference_folds_to_the_merged_models_output_on_cuda(dtype):
    model = _layer(nn.Linear(256, 384), [("a", 16)], dtype).to(DEVICE).eval()
    x = torch.randn(4096, 256, dtype=dtype, device=DEVICE)  # enough rows to fold
    with torch.no_grad():
        got = model(x)
        lorafit.merge(model)
        merged = model(x)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), merged.float(), atol=4 * eps * merged.abs().max().item(), rtol=4 * eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_training_step_never_waits_for_the_gpu(dtype):
    """Forward, backward, clipping and AdamW through LoRA layers with dropout (two adapters on one layer, one
    on the next), and the training loop's batch copy, with no host sync: torch's sync debug mode raises on any.
    A sync would leave the GPU idle while the host issues the next kernels, which small layers cannot afford."""
    from lorafit.train.loop import on_device

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).to(DEVICE, dtype)
    lorafit.attach(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["0", "2"],
                                     init_lora_weights=False))
    lorafit.attach(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["0"],
                                     init_lora_weights=False), "second")
    lorafit.set_active(model, ["default", "second"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    cpu_batch = {"x": torch.randn(3, 50, 64, dtype=dtype)}

    def step():
        x = on_device(cpu_batch, torch.device(DEVICE))["x"]
        model(x).float().pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    _steps_without_sync(step)
    assert all(torch.isfinite(p).all() for p in params)


def _steps_without_sync(step) -> None:
    """step() once (Triton compiles, the caching allocators fill, a first batch's checks run), then twice under
    torch's sync debug mode, which raises on any host sync."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def _task_steps_without_sync(task, model, cpu_batch: dict) -> None:
    """A lorafit train step of ``task`` on the batch (its loss per unit, backward, AdamW on the trainable
    parameters) never waits for the GPU (``_steps_without_sync``), and leaves the parameters finite."""
    from lorafit.train.loop import on_device

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    units = int(cpu_batch["units"])

    def step():
        (task.loss_sum(model, on_device(cpu_batch, torch.device(DEVICE))) / units).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)

    _steps_without_sync(step)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("neftune", [False, True])
def test_a_causal_lm_training_step_never_waits_for_the_gpu(neftune):
    """`lorafit train`'s causal-LM step on a right-padded batch from collate (no attention mask reaches the
    model; the loss positions come with the batch), LoRA with dropout, backward and AdamW on the bf16 adapters'
    float32 masters, and NEFTune's noisy embeddings: no host sync after the first step (which checks the model's
    head once)."""
    from lorafit.train.config import RunConfig
    from lorafit.train.loop import on_device
    from lorafit.train.master_weights import MasterWeights
    from lorafit.train.neftune import add_embedding_noise
    from lorafit.train.tasks import IGNORE, CausalLM

    model = _llama(torch.bfloat16)
    lorafit.attach(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))
    if neftune:
        add_embedding_noise(model, 5.0)
    params = [p for p in model.parameters() if p.requires_grad]
    masters = MasterWeights(model)
    assert len(masters.masters) == len(params)
    opt = torch.optim.AdamW(masters.for_optimizer(params), lr=1e-3, foreach=True)
    before = [p.detach().clone() for p in params]
    task = CausalLM(RunConfig(), Tok())
    gen = torch.Generator().manual_seed(0)
    feats = []
    for n in (40, 17, 33):
        ids = torch.randint(1, 256, (n,), generator=gen).tolist()
        feats.append({"input_ids": ids, "labels": [IGNORE] * (n // 2) + ids[n // 2:]})
    cpu_batch = task.collate(feats)

    def step():
        batch = on_device(cpu_batch, torch.device(DEVICE))
        (task.loss_sum(model, batch) / int(cpu_batch["units"])).backward()
        masters.take_grads()
        opt.step()
        masters.put_back()
        opt.zero_grad(set_to_none=False)

    _steps_without_sync(step)
    assert all(torch.isfinite(p).all() for p in params)
    assert all(torch.equal(p, m.to(p.dtype)) for p, m in zip(params, masters.masters))
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


class Tok:
    """What the preference tasks read of a tokenizer when the features are made already."""
    chat_template, pad_token_id = None, 0

    def __len__(self) -> int:
        return 256


def _adapted_llama(dtype: torch.dtype, seed: int):
    """The tiny Llama on the GPU with an all-linear adapter whose B factors are random (the adapter counts), and
    the generator that drew them (for the batch's tokens)."""
    model = _llama(dtype)
    lorafit.attach(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model, gen


def _pairs(gen: torch.Generator) -> list[dict]:
    """Three preference pairs of random tokens, the first 6 of each the prompt."""
    from lorafit.train.tasks import IGNORE

    feats = []
    for n, m in ((30, 24), (12, 19), (25, 25)):
        chosen, rejected = (torch.randint(1, 256, (k,), generator=gen).tolist() for k in (n, m))
        feats.append({"input_ids": chosen, "labels": [IGNORE] * 6 + chosen[6:],
                      "rejected_ids": rejected, "rejected_labels": [IGNORE] * 6 + rejected[6:]})
    return feats


@pytest.mark.parametrize("loss", ["dpo", "orpo"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dpo_step_matches_the_cpu_and_never_waits_for_the_gpu(dtype, loss):
    """task.type "preference": the loss of a batch of pairs on the GPU is the CPU's in float32 (DPO's reference
    forward with the adapter switched off included; ORPO's log odds without one), and its steps never wait for
    the GPU."""
    from lorafit.train.config import RunConfig
    from lorafit.train.loop import on_device
    from lorafit.train.preference import Preference

    model, gen = _adapted_llama(dtype, seed=3)
    config = RunConfig()
    config.task.type, config.task.preference_loss = "preference", loss
    feats = _pairs(gen)
    cpu_batch = Preference(config, Tok()).collate(feats)
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32)
    with torch.no_grad():
        want = Preference(config, Tok()).loss_sum(cpu_model, cpu_batch)
    task = Preference(config, Tok())
    with torch.no_grad():
        got = task.loss_sum(model, on_device(cpu_batch, torch.device(DEVICE)))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)
    _task_steps_without_sync(task, model, cpu_batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_precomputed_references_give_the_inline_loss_and_never_wait_for_the_gpu(dtype):
    """task.precompute_reference on the GPU: the reference log-probabilities computed once (in evaluation batches)
    give the loss of the step that runs the reference itself, and a step with them never waits for the GPU."""
    import contextlib

    from lorafit.train.config import RunConfig
    from lorafit.train.loop import on_device
    from lorafit.train.preference import Preference
    from lorafit.train.reference import with_reference

    model, gen = _adapted_llama(dtype, seed=6)
    config = RunConfig()
    config.task.type = "preference"
    task = Preference(config, Tok())
    feats = _pairs(gen)
    known = with_reference(task, model, feats, torch.device(DEVICE), 2, contextlib.nullcontext)
    with torch.no_grad():
        inline = task.loss_sum(model, on_device(task.collate(feats), torch.device(DEVICE)))
        got = task.loss_sum(model, on_device(task.collate(known.rows(range(3))), torch.device(DEVICE)))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), inline.float(), rtol=tol, atol=tol)
    _task_steps_without_sync(task, model, task.collate(known.rows(range(3))))


def test_a_kto_step_matches_the_cpu_and_never_waits_for_the_gpu():
    """task.type "kto": four forwards a step (the rows with gradients; the mismatched rows and the reference on
    both without), a KL estimate and per-row branches by label, all on the GPU: the loss is the CPU's and its
    steps never wait for the GPU."""
    from lorafit.train.config import RunConfig
    from lorafit.train.kto import KTO
    from lorafit.train.loop import on_device
    from lorafit.train.tasks import IGNORE

    model, gen = _adapted_llama(torch.float32, seed=4)
    config = RunConfig()
    config.task.type = "kto"
    feats = []
    for n, m, good in ((30, 24, 1), (12, 19, 0), (25, 25, 1)):
        seq, kl = (torch.randint(1, 256, (k,), generator=gen).tolist() for k in (n, m))
        feats.append({"input_ids": seq, "labels": [IGNORE] * 6 + seq[6:], "kl_ids": kl,
                      "kl_labels": [IGNORE] * 6 + kl[6:], "label": good})
    task = KTO(config, Tok())
    cpu_batch = task.collate(feats)
    with torch.no_grad():
        want = KTO(config, Tok()).loss_sum(copy.deepcopy(model).to("cpu"), cpu_batch)
        got = task.loss_sum(model, on_device(cpu_batch, torch.device(DEVICE)))
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    _task_steps_without_sync(task, model, cpu_batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_reward_model_step_matches_the_cpu_and_never_waits_for_the_gpu(dtype):
    """task.type "reward": the scores of a right-padded batch of pairs (read at each row's last real token) and
    their loss on the GPU are the CPU's, and its steps never wait for the GPU."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from lorafit.train.config import RunConfig
    from lorafit.train.loop import on_device
    from lorafit.train.reward import Reward

    class Tok:
        chat_template, pad_token_id = "{{ messages }}", 0

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg).to(DEVICE, dtype)
    lorafit.attach(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"))
    config = RunConfig()
    config.task.type, config.task.reward_centering = "reward", 0.01
    gen = torch.Generator().manual_seed(5)
    feats = [{"input_ids": torch.randint(1, 256, (n,), generator=gen).tolist(),
              "rejected_ids": torch.randint(1, 256, (m,), generator=gen).tolist()} for n, m in ((30, 24), (12, 19))]
    task = Reward(config, Tok())
    cpu_batch = task.collate(feats)
    cpu_model = copy.deepcopy(model).to("cpu", torch.float32)
    with torch.no_grad():
        want = torch.stack(task.scores(cpu_model, cpu_batch))
        got = torch.stack(task.scores(model, on_device(cpu_batch, torch.device(DEVICE))))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
    _task_steps_without_sync(task, model, cpu_batch)


def test_float16_weights_train_on_cuda(tmp_path):
    """`lorafit train` on float16 weights: float32 adapters under fp16 autocast with loss scaling, through the
    fused path and its Triton masks in float16; the losses stay finite and fall."""
    from lorafit.train import train
    from tests.test_train_loop import train_losses
    from tests.test_train_support import instruction_setup

    lora = 'r = 4\nlora_alpha = 8\nlora_dropout = 0.1\ntarget_modules = "all-linear"'
    config = instruction_setup(tmp_path, 24, lora=lora, train="epochs = 4\nbatch_size = 8\nlr = 1e-2\nlog_every = 1")
    summary = train(config, ["model.dtype=float16", f"model.device={DEVICE}"], progress=False)
    losses = train_losses(tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in summary.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_dora", [False, True])
def test_every_layer_kind_matches_float64_on_the_cpu(dtype, use_dora):
    """Embedding, Conv1d, GPT-2 Conv1D, Linear and Conv2d adapters (plain or DoRA), trained with
    dropout 0: the output and every trainable gradient on the GPU are the CPU's in float64, to the dtype's
    rounding (float32 without TF32, which cuDNN's convolutions use by default)."""
    from tests.models import ALL_KINDS, Mixed, mixed_inputs, randomize_adapters

    torch.manual_seed(0)
    reference = Mixed().double()
    lorafit.attach(reference, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_KINDS, use_dora=use_dora))
    randomize_adapters(reference, scale=0.3)
    gpu = copy.deepcopy(reference).to(DEVICE, dtype).train()
    reference.train()
    ids, image = mixed_inputs()
    g = torch.randn(ids.shape[0], 3, dtype=torch.float64)
    want = reference(ids, image.double())
    want.backward(g)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # cuBLAS's matmuls have TF32 off by default
        got = gpu(ids.to(DEVICE), image.to(DEVICE, dtype))
        got.backward(g.to(DEVICE, dtype))
    tol = 1e-4 if dtype == torch.float32 else 4e-2
    torch.testing.assert_close(got.double().cpu(), want, atol=tol * max(1.0, want.abs().max().item()), rtol=tol)
    theirs = dict(reference.named_parameters())
    trained = [(n, p) for n, p in gpu.named_parameters() if p.requires_grad]
    assert trained and len(trained) == sum(p.requires_grad for p in reference.parameters())
    for name, p in trained:
        want_grad = theirs[name].grad
        torch.testing.assert_close(p.grad.double().cpu(), want_grad, rtol=tol, msg=name,
                                   atol=tol * max(1e-3, want_grad.abs().max().item()))


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_on_a_quantized_base_on_cuda_matches_the_cpu(bits):
    """QLoRA: the base quantized on the CPU, moved to the GPU (codes and scales as buffers), dequantized there
    on the fly; output and LoRA gradients equal the same model's on the CPU."""
    from lorafit.quantize import QuantizedLinear, quantize_base

    torch.manual_seed(0)
    cpu_model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64))
    quantize_base(cpu_model, bits=bits, skip=())
    lorafit.attach(cpu_model, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False))
    gpu_model = copy.deepcopy(cpu_model).to(DEVICE)
    assert isinstance(gpu_model[0].base_layer, QuantizedLinear)
    x = torch.randn(32, 256)
    want, got = cpu_model(x), gpu_model(x.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)
    want.square().sum().backward()
    got.square().sum().backward()
    grads = {n: p.grad for n, p in cpu_model.named_parameters() if p.requires_grad}
    for name, p in gpu_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.cpu(), grads[name], atol=1e-4 * grads[name].abs().max().item(),
                                       rtol=1e-3, msg=name)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_base_onto_the_gpu_gives_the_cpu_codes_and_moves_nothing_else(bits):
    """quantize_base(device=...): each layer of a CPU model quantized on the GPU (how serve --quantize and
    model.quantize bring a model there) stores the codes the CPU would, and leaves the rest where it was."""
    from lorafit.quantize import quantize_base

    torch.manual_seed(0)
    cpu_model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 64), nn.LayerNorm(64))
    on_device = copy.deepcopy(cpu_model)
    quantize_base(cpu_model, bits=bits, skip=())
    quantize_base(on_device, bits=bits, skip=(), device=DEVICE)
    for i in (0, 2):
        assert on_device[i].codes.device.type == on_device[i].bias.device.type == torch.device(DEVICE).type
        torch.testing.assert_close(on_device[i].codes.cpu(), cpu_model[i].codes, rtol=0, atol=0)
        torch.testing.assert_close(on_device[i].block_absmax().cpu(), cpu_model[i].block_absmax(), rtol=1e-6, atol=0)
    assert on_device[3].weight.device.type == "cpu"  # for the caller to move
    x = torch.randn(8, 256)
    torch.testing.assert_close(on_device.to(DEVICE)(x.to(DEVICE)).cpu(), cpu_model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("neftune", [0, 5])
def test_a_resumed_causal_lm_run_on_cuda_ends_where_an_uninterrupted_one_does(tmp_path, neftune):
    """`lorafit train` on the GPU with LoRA dropout (mask keys drawn from the CUDA generator, masks in Triton),
    and NEFTune's noise (from the CUDA generator too), killed by an exception after a checkpoint and resumed:
    the checkpoint restores the CUDA random state, so the adapter ends where an uninterrupted run's does (to the
    float32 rounding the first steps' torch stand-ins for still-compiling kernels, and attention's backward, may
    differ by)."""
    import json

    from lorafit.train import train
    from tests.test_train_loop import Crash, adapter_tensors, crash_at
    from tests.test_train_support import instruction_setup

    lora = 'r = 4\nlora_alpha = 8\nlora_dropout = 0.2\ntarget_modules = "all-linear"'
    config = instruction_setup(tmp_path, 24, lora=lora,
                               train="epochs = 3\nbatch_size = 4\nlr = 1e-3\nsave_every = 5\nlog_every = 1")
    device = ["model.dtype=float32", f"model.device={DEVICE}", f"train.neftune_noise_alpha={neftune}"]
    full = train(config, device + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    args = device + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(12),), progress=False)  # the last checkpoint: step 10
    resumed = train(config, args, resume=True, progress=False)
    assert resumed["steps"] == full["steps"] == 18
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4 * max(1.0, a[key].abs().max().item()), rtol=1e-3,
                                   msg=key)  # other masks after the resume would move them by about lr


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grpo_trains_on_cuda_and_resumes_to_the_same_samples(tmp_path, dtype):
    """`lorafit train` with task.type = "grpo" on the GPU: sampling, the rewards, the loss with the KL term (the
    base, the adapter off), in float32 and bfloat16; in bfloat16 with two clipped steps per batch of samples,
    DAPO's loss and batch-scaled advantages, the reward rises as on the CPU. In float32 a resumed run draws the
    uninterrupted run's samples (the checkpoint restores the CUDA random state) and ends at its adapter (in
    bfloat16 a rounding difference in the logits may flip a sample)."""
    import json

    from lorafit.train import evaluate, train
    from tests.test_train_grpo import grpo_setup
    from tests.test_train_loop import Crash, adapter_tensors, crash_at

    extra = ["train.save_every=3"] if dtype == "float32" else \
        ["task.num_iterations=2", "task.grpo_loss=dapo", "task.scale_rewards='batch'", "train.save_every=4"]
    config, settings = grpo_setup(tmp_path, extra=["task.grpo_beta=0.1", f"model.dtype={dtype}",
                                                   f"model.device={DEVICE}", *extra])
    full = train(config, settings + [f"output_dir={json.dumps(str(tmp_path / 'a'))}"], progress=False)
    assert 0 <= full["validation"]["reward"] <= 1 and full["validation"]["completion_length"] > 0
    if dtype == "bfloat16":
        base = evaluate(tmp_path / "a", base=True)
        assert full["validation"]["reward"] > base["reward"] + 0.3, (full["validation"], base)
        return
    args = settings + [f"output_dir={json.dumps(str(tmp_path / 'b'))}"]
    with pytest.raises(Crash):
        train(config, args, callbacks=(crash_at(8),), progress=False)  # the last checkpoint: step 6
    train(config, args, resume=True, progress=False)
    a, b = adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(b[key].float(), a[key].float(), atol=1e-3 * max(1.0, a[key].abs().max().item()),
                                   rtol=1e-2, msg=key)


@pytest.mark.parametrize("loss", ["cispo", "sapo"])
def test_grpo_s_other_objectives_and_entropy_terms_train_on_cuda(tmp_path, loss):
    """bfloat16 on the GPU: TRL's cispo or sapo with two steps on each batch of samples, the entropy bonus (its
    gradient through the chunked head) and the policy term on the highest-entropy half of the tokens (the
    quantile taken on the device): the reward rises as on the CPU."""
    from lorafit.train import evaluate, train
    from tests.test_train_grpo import grpo_setup

    config, settings = grpo_setup(tmp_path, extra=["model.dtype=bfloat16", f"model.device={DEVICE}",
                                                   f"task.grpo_loss={loss}", "task.num_iterations=2",
                                                   "task.entropy_coef=0.01", "task.top_entropy_quantile=0.5",
                                                   "train.epochs=2"])
    summary = train(config, settings, progress=False)
    base = evaluate(tmp_path / "run", base=True)
    assert summary["validation"]["reward"] > base["reward"] + 0.3, (summary["validation"], base)


def test_lorafit_serve_on_cuda(tmp_path):
    """`lorafit serve` with its model on the GPU: classification across adapters gives the probabilities the
    model gives on the CPU, and greedy generation with an adapter gives transformers' generate on the GPU."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from lorafit.serve.app import create_app
    from lorafit.serve.server import build_service
    from tests import serve_models as sm
    from tests.test_serve_api import _direct_probs

    bert, llama = sm.bert_dir(tmp_path), sm.llama_dir(tmp_path)
    for i, name in enumerate(["a", "b"]):
        sm.make_adapter(bert, tmp_path / "cls" / name, seed=i, r=4)
        sm.make_adapter(llama, tmp_path / "gen" / name, seed=10 + i, r=4)
    texts = ["great movie", "the plot was boring and bad", "fun"]
    service = build_service(str(bert), tmp_path / "cls", device=DEVICE)
    assert service.model.device.type == torch.device(DEVICE).type
    with TestClient(create_app(service)) as client:
        for adapter in ("a", "b", None):
            got = client.post("/v1/classify", json={"texts": texts, "adapter": adapter})
            assert got.status_code == 200, got.text
            probs = torch.tensor([list(r["probabilities"].values()) for r in got.json()["results"]])
            want = _direct_probs(bert, tmp_path / "cls" / adapter if adapter else None, texts)
            torch.testing.assert_close(probs, want, atol=1e-4, rtol=1e-3)
    tok = sm.tokenizer(causal=True)
    model = sm.load(llama).to(DEVICE)
    lorafit.load_adapter(model, tmp_path / "gen" / "b")
    ids = tok("hello world the movie", return_tensors="pt")["input_ids"].to(DEVICE)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0, eos_token_id=3)
    service = build_service(str(llama), tmp_path / "gen", device=DEVICE)
    with TestClient(create_app(service)) as client:
        got = client.post("/v1/generate", json={"prompt": "hello world the movie", "adapter": "b", "max_new_tokens": 6})
    assert got.status_code == 200, got.text
    assert got.json()["text"] == tok.decode(ref[0, ids.shape[1]:].cpu(), skip_special_tokens=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_weight_adapters_match_peft_and_unmerge_exactly_on_cuda(dtype, tmp_path):
    """target_parameters on a Mixtral's stacked expert weights: PEFT reads lorafit's file to the same logits and
    gradients; a merge gives the unmerged model's numbers, and unmerging a bf16 one restores the weights bit for
    bit."""
    from peft import PeftModel

    from tests.test_target_parameters import EXPERTS, mixtral, randomize

    ours = lorafit.attach(mixtral(dtype=dtype).to(DEVICE), LoraConfig(r=4, target_parameters=EXPERTS))
    randomize(ours)
    lorafit.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(mixtral(dtype=dtype).to(DEVICE), tmp_path, is_trainable=True)
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    grads = []
    for model in (ours, theirs):
        out = model(ids).logits
        out.float().square().mean().backward()
        grads.append({n.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", ""):
                      p.grad for n, p in model.named_parameters() if ".lora_" in n})
        model.zero_grad()
        if model is ours:
            unmerged = out.detach()
    torch.testing.assert_close(out.detach().float(), unmerged.float(), **tol)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 8
    for key, grad in grads[0].items():
        torch.testing.assert_close(grad.float(), grads[1][key].float(), **tol)

    before = {n: p.detach().clone() for n, p in ours.named_parameters() if ".lora_" not in n}
    lorafit.merge(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits.float(), unmerged.float(), **tol)
    lorafit.unmerge(ours)
    for n, p in ours.named_parameters():  # bf16 keeps its weights from before the merge; float32 subtracts
        if ".lora_" not in n:
            torch.testing.assert_close(p, before[n], rtol=0 if dtype == torch.bfloat16 else 1e-6,
                                       atol=0 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_trainable_token_rows_match_peft_on_cuda(tied, tmp_path):
    """trainable_token_indices with a tied head, or rows of an untied head, attached on the CPU and moved to the
    GPU: PEFT reads the file to the same logits and gradients."""
    from peft import PeftModel

    from tests.test_trainable_tokens import IDS, TOKENS, UNTIED_HEAD, llama, new_rows

    tokens = TOKENS if tied else UNTIED_HEAD
    ours = lorafit.attach(llama(tied), LoraConfig(target_modules=["q_proj"], trainable_token_indices=tokens))
    new_rows(ours)
    ours.to(DEVICE)
    lorafit.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(llama(tied).to(DEVICE), tmp_path, is_trainable=True)
    grads = []
    for model in (ours, theirs):
        out = model(IDS.to(DEVICE)).logits
        out.square().mean().backward()
        grads.append(sorted((n.removeprefix("base_model.model."), p.grad) for n, p in model.named_parameters()
                            if p.requires_grad))
        if model is ours:
            want = out.detach()
    torch.testing.assert_close(out.detach(), want, rtol=1e-4, atol=1e-4)
    # the rows (and the head's), and A and B of q_proj in 2 layers
    assert len(grads[0]) == len(grads[1]) == (5 if tied else 6)
    for (_, a), (_, b) in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_bias_matches_peft_and_unmerges_exactly_on_cuda(dtype, tmp_path):
    """lora_bias through the fused path on the GPU: PEFT reads the file to the same logits and gradients, and a
    merge adds the bias, which unmerge takes out (bf16: bit for bit)."""
    from peft import PeftModel

    from tests.test_lora_bias import IDS, TARGETS, llama, randomize

    ours = lorafit.attach(llama(dtype), LoraConfig(r=2, target_modules=TARGETS, lora_bias=True)).to(DEVICE)
    randomize(ours)
    lorafit.save_adapter(ours, tmp_path)
    theirs = PeftModel.from_pretrained(llama(dtype).to(DEVICE), tmp_path, is_trainable=True)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    outs, grads = [], []
    for model in (ours, theirs):
        out = model(IDS.to(DEVICE)).logits
        out.float().square().mean().backward()
        outs.append(out.detach().float())
        grads.append({n.removeprefix("base_model.model.").replace(".default.weight", "")
                      .replace(".default.bias", "_bias").replace(".default", ""): p.grad
                      for n, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(outs[0], outs[1], **tol)
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        want = grads[1][key].float()
        torch.testing.assert_close(grad.float(), want, atol=tol["atol"] * max(want.abs().max().item(), 1e-3),
                                   rtol=tol["rtol"] * 4, msg=key)
    ours.eval()
    before = {n: p.clone() for n, p in ours.named_parameters()}
    with torch.no_grad():
        unmerged = ours(IDS.to(DEVICE)).logits
        lorafit.merge(ours)
        torch.testing.assert_close(ours(IDS.to(DEVICE)).logits.float(), unmerged.float(), **tol)
        lorafit.unmerge(ours)
    for name, p in ours.named_parameters():  # float32 merges in place and subtracts: exact to rounding
        torch.testing.assert_close(p, before[name], rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eva_on_cuda_finds_the_components_the_cpu_finds(dtype):
    """attach_eva with the model on the GPU (batches given on the CPU): the same ranks and, to the precision of the
    layer inputs' dtype, the same principal directions as on the CPU in float32."""
    from tests.test_eva import TARGETS, batches, llama, unit

    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, eva_config={"tau": 1.0})
    data = batches(4)
    with pytest.warns(UserWarning, match="the batches ran out"):
        on_cpu = lorafit.attach_eva(llama(), config, data)
        on_gpu = lorafit.attach_eva(llama().to(DEVICE, dtype), config, data)
    want, got = dict(lorafit.model.lora_layers(on_cpu)), dict(lorafit.model.lora_layers(on_gpu))
    ranks = [{n: layer.rank["default"] for n, layer in layers.items()} for layers in (want, got)]
    assert sum(ranks[0].values()) == sum(ranks[1].values()) == 4 * len(TARGETS) * 2  # the budget
    if dtype == torch.float32:  # bf16 inputs may reorder components whose variances are close, across layers
        assert ranks[0] == ranks[1]
    for name, layer in got.items():
        if name not in want:
            continue
        a = layer.lora_A["default"]
        assert a.device.type == torch.device(DEVICE).type and a.dtype == dtype
        k = min(a.shape[0], want[name].lora_A["default"].shape[0])
        cosines = (unit(a[:k].float().cpu()) * unit(want[name].lora_A["default"][:k])).sum(1).abs()
        # bf16 inputs move the directions whose variances are close: compare the leading ones
        leading = cosines if dtype == torch.float32 else cosines[:2]
        assert (leading > (0.999 if dtype == torch.float32 else 0.9)).all(), (name, cosines)


def test_loftq_on_cuda_is_kept_exactly_by_quantize_base():
    """LoftQ with the weights on the GPU (the quantizer's dequantization is the Triton kernel there): the base holds
    a fixed point of the quantizer, quantize_base stores exactly it, and the start is the CPU's."""
    from lorafit.quantize import QuantizedLinear, quantize_base
    from tests.test_loftq import config, llama, logits

    reference = logits(llama())
    on_cpu = lorafit.attach(llama(), config(loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    on_gpu = lorafit.attach(llama().to(DEVICE), config(loftq_config={"loftq_bits": 4, "loftq_iter": 2}))
    layers = dict(lorafit.model.lora_layers(on_gpu))
    grids = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
    start = logits(on_gpu).cpu()
    quantize_base(on_gpu, 4)
    for name, layer in layers.items():
        assert isinstance(layer.base_layer, QuantizedLinear)
        assert layer.base_layer.codes.device.type == torch.device(DEVICE).type
        assert torch.equal(layer.base_layer.dequantize(torch.float32), grids[name]), name
    torch.testing.assert_close(logits(on_gpu).cpu(), start, rtol=0, atol=1e-5)
    # the SVDs round differently on the two devices, and a value on a boundary between codes may take the other
    # one: the two starts are equally near the float model
    errors = [(out - reference).abs().mean().item() for out in (start, logits(on_cpu))]
    assert errors[0] == pytest.approx(errors[1], rel=0.1), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alora_matches_peft_on_cuda_and_finds_the_invocation_without_a_sync(dtype, tmp_path):
    """aLoRA on the GPU: PEFT's logits (its search for the invocation syncs; lorafit's runs on the device), and
    a training forward and backward with no host sync."""
    from tests.test_alora import IDS, llama, peft_alora

    theirs, directory = peft_alora(tmp_path)
    theirs = theirs.to(DEVICE, dtype)
    ours = lorafit.load_adapter(llama().to(DEVICE, dtype), directory, trainable=True)
    ids = IDS.to(DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0,
                                   atol=1e-5 if dtype == torch.float32 else 0.05)
    # lorafit's part of a training step (the hook's search, an adapted layer's forward and backward); the model
    # around it is transformers'
    ours.train()
    state, layer = lorafit.alora.activation(ours), ours.model.layers[0].self_attn.q_proj
    x = torch.randn(*ids.shape, layer.in_features, device=DEVICE, dtype=dtype, requires_grad=True)
    for check in (False, True):  # a warm-up first
        torch.cuda.synchronize()
        if check:
            torch.cuda.set_sync_debug_mode("error")
        try:
            state._before_forward(ours, (), {"input_ids": ids})
            layer(x).float().square().mean().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert x.grad is not None


def test_corda_on_cuda_matches_the_cpu():
    """attach_corda with the model on the GPU: the factors and residual weights of the CPU (covariances, inverse and
    SVD in float32 on the device)."""
    from tests.test_corda import config, llama, rows

    batches = [{"input_ids": rows()}]
    on_cpu = lorafit.attach_corda(llama(), config(), batches)
    on_gpu = lorafit.attach_corda(llama().to(DEVICE), config(), batches)
    want = on_cpu.state_dict()
    for key, value in on_gpu.state_dict().items():
        # a singular vector's sign is the SVD's choice: compare B A and the residual, which do not depend on it
        if "lora_" not in key:
            torch.testing.assert_close(value.cpu(), want[key], rtol=1e-3, atol=1e-4, msg=key)

    def delta(layer):
        return (layer.lora_B["default"] @ layer.lora_A["default"]).cpu()

    for (name, a), (_, b) in zip(lorafit.model.lora_layers(on_gpu), lorafit.model.lora_layers(on_cpu)):
        torch.testing.assert_close(delta(a), delta(b), rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mica_on_cuda_matches_the_cpu_and_trains_a_only(dtype):
    """MiCA's B on the GPU spans what the CPU's spans (the SVD's signs are its own), A starts at zero, and a
    training step in the model's dtype leaves B as it was, with no gradient computed for it."""
    from tests.test_mica import config, ids, llama

    on_cpu = lorafit.attach(llama().to(dtype), config())
    on_gpu = lorafit.attach(llama().to(DEVICE, dtype), config())
    for (name, a), (_, b) in zip(lorafit.model.lora_layers(on_gpu), lorafit.model.lora_layers(on_cpu)):
        ga, gb = a.factors_b["default"].float().cpu(), b.factors_b["default"].float()
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(ga @ ga.T, gb @ gb.T, rtol=tol, atol=tol, msg=name)
        assert not a.factors_a["default"].any()
    before = {n: p.detach().clone() for n, p in on_gpu.named_parameters() if "_B." in n}
    on_gpu.train()
    batch = ids().to(DEVICE)
    on_gpu(input_ids=batch, labels=batch).loss.backward()
    torch.optim.SGD([p for p in on_gpu.parameters() if p.requires_grad], lr=0.1).step()
    assert all(p.grad is None and torch.equal(p, before[n]) for n, p in on_gpu.named_parameters() if "_B." in n)
    assert all(p.grad is not None for n, p in on_gpu.named_parameters() if "_A." in n)


def test_lora_ga_on_cuda_matches_the_cpu(monkeypatch):
    """attach_lora_ga with the model on the GPU: the gradients, factors and residual weights of the CPU (with the
    SVD made deterministic, as in test_lora_ga), and a bf16 model starts where its base does."""
    from tests.test_lora_ga import batches, config, exact_svd_lowrank, llama

    monkeypatch.setattr(torch, "svd_lowrank", exact_svd_lowrank)
    data = batches()
    on_cpu = lorafit.attach_lora_ga(llama(), config(), data)
    on_gpu = lorafit.attach_lora_ga(llama().to(DEVICE), config(), data)
    want = on_cpu.state_dict()
    for key, value in on_gpu.state_dict().items():
        torch.testing.assert_close(value.cpu(), want[key], rtol=1e-3, atol=1e-4, msg=key)
    ids = data[0]["input_ids"].to(DEVICE)
    base = llama().to(DEVICE, torch.bfloat16)
    model = lorafit.attach_lora_ga(llama().to(DEVICE, torch.bfloat16), config(), data)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits.float(), base(input_ids=ids).logits.float(),
                                   rtol=0, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_arrow_routing_on_cuda_matches_the_cpu_without_a_sync(dtype, tmp_path):
    """Arrow routing on the GPU: the CPU's logits (prototypes, top-k and the mixture on the device), and a routed
    layer's forward with no host sync."""
    from tests.test_arrow import experts, ids, loaded

    names = ["e0", "e1", "e2"]
    dirs = experts(tmp_path, names)
    on_cpu = loaded(dirs, names).to(dtype)
    on_gpu = loaded(dirs, names).to(DEVICE, dtype)
    # in bf16 two experts' scores can tie to rounding and the top 2 differ between devices: all 3 there
    top_k = 2 if dtype == torch.float32 else 3
    with torch.no_grad(), lorafit.arrow_routing(on_cpu, names, top_k=top_k):
        want = on_cpu(input_ids=ids()).logits.float()
    with torch.no_grad(), lorafit.arrow_routing(on_gpu, names, top_k=top_k):
        got = on_gpu(input_ids=ids().to(DEVICE)).logits.float().cpu()
        layer = on_gpu.model.layers[0].mlp.up_proj
        x = torch.randn(64, layer.in_features, device=DEVICE, dtype=dtype)
        for check in (False, True):  # a warm-up first
            torch.cuda.synchronize()
            if check:
                torch.cuda.set_sync_debug_mode("error")
            try:
                layer(x)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 if dtype == torch.float32 else 0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hotswap_into_a_compiled_model_on_cuda_recompiles_nothing(dtype, tmp_path):
    """Adapters of other ranks and scales swapped into a compiled bf16/fp32 model on the GPU: what each computes
    loaded alone, and no recompilation (the guards decide that, so the eager backend shows it)."""
    ids = torch.randint(0, 256, (2, 16), device=DEVICE)
    expected = {}
    for label, config in (("a", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)),
                          ("b", LoraConfig(r=2, lora_alpha=32, target_modules=TARGETS[:1]))):
        alone = _llama(dtype)
        lorafit.attach(alone, config)
        for p in lorafit.adapter_parameters(alone, "default").values():
            nn.init.normal_(p, std=0.05)
        lorafit.save_adapter(alone, tmp_path / label)
        with torch.no_grad():
            expected[label] = alone(ids).logits
    model = _llama(dtype)
    lorafit.attach(model, LoraConfig(r=8, target_modules=TARGETS), trainable=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    with torch.no_grad():
        compiled(ids)
        with torch.compiler.set_stance("fail_on_recompile"):
            for label in ("a", "b", "a"):
                lorafit.hotswap_adapter(model, tmp_path / label)
                torch.testing.assert_close(compiled(ids).logits.float(), expected[label].float(), **tol)


# last: inductor's compile takes longest, and gpu.sh gives the CUDA tests a time limit
def test_torch_compile_matches_eager_on_cuda(dropout=0.1):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = _llama(torch.bfloat16)
    lorafit.attach(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=TARGETS))
    for layer in model.model.layers:
        nn.init.normal_(layer.self_attn.q_proj.lora_B["default"], std=0.02)
    model.train()
    ids = torch.randint(0, 256, (2, 64), device=DEVICE)
    compiled = torch.compile(model, fullgraph=False)
    with inductor_config.patch(fallback_random=True):  # inductor draws the mask keys as eager does
        torch.manual_seed(9)
        got = compiled(ids, labels=ids)
        got.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    torch.manual_seed(9)
    want = model(ids, labels=ids)
    want.loss.backward()
    torch.testing.assert_close(got.logits.float(), want.logits.float(), atol=0.05, rtol=0.05)
    for g, p in zip(grads, (p for p in model.parameters() if p.requires_grad)):
        torch.testing.assert_close(g.float(), p.grad.float(), atol=0.05 * max(p.grad.abs().max().item(), 1e-3),
                                   rtol=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tied_lora_head_matches_peft_and_merges_into_one_weight_on_cuda(dtype, tmp_path):
    """ensure_weight_tying on the GPU: a PEFT file gives PEFT's logits, the embedding's factors get the sum of
    PEFT's two gradients, merging keeps one weight (bf16: unmerged bit for bit), and a batch with an adapter per
    row applies each row's tied head."""
    from tests.test_ensure_weight_tying import IDS, peft_tied, tied_llama

    theirs = peft_tied(tmp_path, dtype, target_modules=["embed_tokens", "q_proj"]).to(DEVICE)
    ours = lorafit.load_adapter(tied_llama(dtype).to(DEVICE), tmp_path, trainable=True)
    ids = IDS.to(DEVICE)
    outs = []
    for model in (theirs, ours):
        out = model(input_ids=ids).logits
        out.float().square().mean().backward()
        outs.append(out.detach().float())
    tol = 1e-4 if dtype == torch.float32 else 0.02 * outs[0].abs().max().item()
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=tol)
    emb, head = theirs.base_model.model.model.embed_tokens, theirs.base_model.model.lm_head
    grad_a = emb.lora_embedding_A["default"].grad + head.lora_B["default"].weight.grad.T
    mine = ours.model.embed_tokens.lora_embedding_A["default"].grad
    torch.testing.assert_close(mine.float(), grad_a.float(), rtol=0.02, atol=0.02 * grad_a.abs().max().item())

    ours.eval()
    weight = ours.model.embed_tokens.base_layer.weight
    original, unmerged = weight.detach().clone(), ours(input_ids=ids).logits.detach().float()
    lorafit.merge(ours)
    assert ours.lm_head.base_layer.weight is weight
    torch.testing.assert_close(ours(input_ids=ids).logits.detach().float(), unmerged, rtol=0, atol=tol)
    lorafit.unmerge(ours)
    if dtype == torch.bfloat16:
        assert torch.equal(weight, original)
    with torch.no_grad(), lorafit.adapter_per_row(ours, ["default", None]):
        mixed = ours(input_ids=ids).logits.float()
    torch.testing.assert_close(mixed[0], unmerged[0], rtol=0, atol=tol)


def test_per_row_variants_match_rows_alone_without_a_sync_on_cuda():
    """adapter_per_row with token rows (a tied head scoring with them), DoRA, aLoRA and a plain adapter on the GPU:
    each row as alone, and a forward inside the block never waits for the device."""
    from tests.test_trainable_tokens import llama, new_rows

    model = llama(True).to(DEVICE)
    lorafit.attach(model, LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 7]), "t")
    lorafit.attach(model, LoraConfig(target_modules=["v_proj", "o_proj"], use_dora=True, init_lora_weights=False), "d")
    lorafit.attach(model, LoraConfig(target_modules=["q_proj"], alora_invocation_tokens=[5], init_lora_weights=False),
                   "al")
    lorafit.attach(model, LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "p")
    new_rows(model, lora=False)
    ids = torch.tensor([[1, 3, 5, 7, 9, 2], [7, 3, 4, 5, 8, 6], [1, 2, 5, 4, 3, 7], [3, 3, 7, 1, 2, 9],
                        [5, 7, 5, 3, 5, 5]], device=DEVICE)
    rows = ["t", "d", "al", "p", None]
    with torch.no_grad():
        with lorafit.adapter_per_row(model, rows):
            model(input_ids=ids)  # the block's first forward builds and gathers the stacks
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                mixed = model(input_ids=ids).logits
            finally:
                torch.cuda.set_sync_debug_mode("default")
        alone = rows_alone(model, rows, lambda k: model(input_ids=ids[k:k + 1]).logits)
        torch.testing.assert_close(mixed, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_bitsandbytes_base_matches_peft_and_merges_to_a_float_model_on_cuda(bits, use_dora, tmp_path):
    """A model transformers loads in 4 or 8 bits with bitsandbytes, bfloat16 otherwise: PEFT's adapter file gives
    PEFT's logits and gradients, and merge_and_unload gives a bfloat16 model with the unmerged logits (to the
    rounding of the merged weights, and of LLM.int8's 8-bit activations)."""
    pytest.importorskip("bitsandbytes")
    import peft

    from tests.test_bitsandbytes import IDS, TARGETS, logits_and_grads, quantized, save_float_llama

    save_float_llama(tmp_path / "float")
    dtype = torch.bfloat16
    theirs = peft.get_peft_model(quantized(tmp_path / "float", bits, DEVICE, dtype), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora))
    expected, expected_grads = logits_and_grads(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(quantized(tmp_path / "float", bits, DEVICE, dtype), tmp_path / "peft",
                                trainable=True)
    got, grads = logits_and_grads(ours)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.02, atol=0.02)
    assert grads.keys() == expected_grads.keys() and grads
    for key, grad in grads.items():
        want = expected_grads[key].view(grad.shape).float()
        torch.testing.assert_close(grad.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())

    merged = lorafit.merge_and_unload(ours)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert type(q_proj) is nn.Linear and q_proj.weight.dtype == dtype and q_proj.weight.device == got.device
    with torch.no_grad():
        logits = merged(input_ids=IDS.to(DEVICE)).logits.float()
    torch.testing.assert_close(logits, got.float(), rtol=0, atol=0.05 * got.float().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kasa_matches_peft_on_cuda(dtype, tmp_path):
    """KaSA on the GPU (the truncating SVD there too, the diagonal folded into A on the fused path): PEFT's
    logits, gradients and regularizer from PEFT's file."""
    import peft

    from tests.test_kasa import IDS, KASA, TARGETS, logits_loss_and_grads

    theirs = peft.get_peft_model(_llama(dtype), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                kasa_config=KASA, init_lora_weights=False))
    ids = IDS.to(DEVICE)
    expected, expected_grads = logits_loss_and_grads(theirs, lambda m: m.base_model._get_kasa_loss(), ids)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lorafit.load_adapter(_llama(dtype), tmp_path / "peft", trainable=True)
    got, grads = logits_loss_and_grads(ours, lorafit.kasa_loss, ids)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
    torch.testing.assert_close(got.float(), expected.float(), **tol)
    assert grads.keys() == expected_grads.keys() and any(".lora_diag" in k for k in grads)
    for key, grad in grads.items():
        want = expected_grads[key].float()
        torch.testing.assert_close(grad.float(), want, rtol=tol["rtol"] * 4,
                                   atol=tol["atol"] * max(want.abs().max().item(), 1e-3))


def test_adapter_trainer_trains_a_4_bit_model_and_resumes_on_cuda(tmp_path):
    """QLoRA through transformers' Trainer on the GPU (bf16, a bitsandbytes 4-bit base): the checkpoints are the
    adapter, and a run resumed from one ends near the uninterrupted run (the GPU's sums are not bit-exact)."""
    pytest.importorskip("bitsandbytes")
    import transformers

    from lorafit.train.hf_trainer import AdapterTrainer
    from tests.test_bitsandbytes import quantized, save_float_llama
    from tests.test_hf_trainer import Rows, StopAt, adapter_state

    save_float_llama(tmp_path / "float")

    def run(out, resume=None, callbacks=()):
        model = quantized(tmp_path / "float", 4, DEVICE, torch.bfloat16)
        torch.manual_seed(0)  # the same A for every run
        lorafit.attach(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS),
                       dtype=torch.float32)
        args = transformers.TrainingArguments(str(tmp_path / out), max_steps=6, save_steps=3, learning_rate=1e-2,
                                              per_device_train_batch_size=4, bf16=True, report_to=[], seed=0,
                                              use_cpu=DEVICE == "cpu")
        AdapterTrainer(model=model, args=args, train_dataset=Rows(), callbacks=list(callbacks)).train(
            resume_from_checkpoint=resume)
        return adapter_state(model)

    expected = run("a")
    assert (tmp_path / "a" / "checkpoint-3" / "adapter_model.safetensors").is_file()
    assert not any(p.name.startswith("model") for p in (tmp_path / "a" / "checkpoint-3").iterdir())
    with pytest.raises(KeyboardInterrupt):
        run("b", callbacks=[StopAt(4)])
    got = run("b", resume=str(tmp_path / "b" / "checkpoint-3"))
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], rtol=0.02, atol=0.02 * expected[key].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lorafa_keeps_no_layer_inputs_and_projects_b_on_cuda(dtype):
    """LoRA-FA on the GPU: the same B gradients as LoRA before the projection (dropout 0.1, the same masks from
    the same seed), fewer bytes kept for backward, and a step that leaves A as it was."""
    from tests.test_lorafa import saved_bytes

    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.1, init_lora_weights=False)
    lora = lorafit.attach(_llama(dtype), config).train()
    fa = lorafit.attach(_llama(dtype), config).train()
    optimizer = lorafit.lorafa_optimizer(fa, lr=1e-3)
    ids = torch.randint(0, 256, (4, 64), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))
    assert saved_bytes(fa, ids) < saved_bytes(lora, ids)
    grads = {}
    for model in (lora, fa):
        torch.manual_seed(5)
        model(ids, labels=ids).loss.backward()
        grads[id(model)] = {n: p.grad for n, p in model.named_parameters() if ".lora_B" in n}
    for name, grad in grads[id(lora)].items():  # dx differs by rounding: A's gradient is fused into it in LoRA
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(grads[id(fa)][name], grad, rtol=tol, atol=tol * grad.abs().max().item())
    a_before = {n: p.clone() for n, p in fa.named_parameters() if ".lora_A" in n}
    optimizer.step()
    assert all(torch.equal(p, a_before[n]) for n, p in fa.named_parameters() if ".lora_A" in n)
    assert all(torch.isfinite(p).all() for n, p in fa.named_parameters() if ".lora_B" in n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multihead_attention_adapters_on_cuda(dtype):
    """nn.MultiheadAttention's adapters (W + s B A in place of in_proj_weight and out_proj.weight), training and
    inference (the encoder's fused path turned off, the attention's own fast path on the sums)."""
    from tests.test_multihead_attention import KEPT, PADDING, TARGETS, X, adapted_weights, net, randomize

    model = lorafit.attach(net(dtype).to(DEVICE), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize(model)
    base = net(dtype).to(DEVICE)
    x, padding, kept = X.to(DEVICE, dtype), PADDING.to(DEVICE), KEPT.to(DEVICE)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for training in (True, False):
        model.train(training), base.train(training)
        with torch.no_grad():
            ours = model(x, padding)
            theirs = torch.func.functional_call(base, adapted_weights(model), (x, padding))
        torch.testing.assert_close(ours[kept], theirs[kept], rtol=tol, atol=tol)
    model.train()
    model(x).float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if p.requires_grad)
