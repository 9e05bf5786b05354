import pytest
import torch
from torch import nn

import lorafit
from lorafit import LoraConfig
from tests.models import ALL_KINDS, Mixed, mixed_inputs, randomize_adapters


def _two_adapters(**second):
    torch.manual_seed(0)
    model = Mixed().eval()
    lorafit.attach(model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL_KINDS), "a")
    lorafit.attach(model, LoraConfig(r=second.pop("r", 2), lora_alpha=3, use_rslora=True,
                                     rank_pattern=second.pop("ranks", {}),
                                     target_modules=second.pop("targets", ALL_KINDS)), "b")
    randomize_adapters(model, scale=0.3)
    return model


def _deltas(model, name):
    return {p: layer.delta_weight(name) for p, layer in lorafit.model.lora_layers(model) if name in layer.adapter_names}


@pytest.mark.parametrize("wa, wb", [(1.0, 1.0), (0.7, -0.4)])
def test_exact_is_the_weighted_sum_of_deltas(wa, wb):
    model = _two_adapters(ranks={"conv2": 3})
    da, db = _deltas(model, "a"), _deltas(model, "b")
    errors = lorafit.combine_adapters(model, {"a": wa, "b": wb}, "ab")
    assert max(errors.values()) < 1e-6
    for path, delta in _deltas(model, "ab").items():
        torch.testing.assert_close(delta, wa * da[path] + wb * db[path], atol=1e-6, rtol=1e-5)
    assert model.mlp[0].lora_A["ab"].shape[0] == 6  # ranks add up, per module
    assert model.conv2.lora_A["ab"].shape[0] == 7
    # and the model output: the combined adapter equals both adapters active, weighted
    inputs = mixed_inputs()
    lorafit.set_active(model, "ab")
    combined = model(*inputs)
    for n, w in (("a", wa), ("b", wb)):
        for layer in lorafit.model.lora_layers(model):
            layer[1].scaling[n] *= w
    lorafit.set_active(model, ["a", "b"])
    torch.testing.assert_close(combined, model(*inputs), atol=1e-5, rtol=1e-5)


def test_negation_cancels_an_adapter():
    model = _two_adapters()
    inputs = mixed_inputs()
    with lorafit.disabled(model):
        base = model(*inputs)
    lorafit.combine_adapters(model, {"a": 1.0, "b": 0.5}, "plus")
    lorafit.combine_adapters(model, {"plus": 1.0, "b": -0.5}, "back")
    lorafit.combine_adapters(model, {"a": 1.0, "back": -1.0}, "zero")
    lorafit.set_active(model, "zero")
    torch.testing.assert_close(model(*inputs), base, atol=1e-5, rtol=0)


def test_svd_truncation_reports_its_error():
    model = _two_adapters()
    full = lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "svd6", method="svd", rank=6)
    assert max(full.values()) < 1e-5  # rank 6 holds a rank <= 6 sum exactly
    cut = lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "svd1", method="svd", rank=1)
    assert min(cut.values()) > 1e-3
    da, db = _deltas(model, "a"), _deltas(model, "b")
    for path, delta in _deltas(model, "svd1").items():
        target = da[path] + db[path]
        rel = ((delta - target).norm() / target.norm()).item()
        assert rel == pytest.approx(cut[path], rel=1e-3, abs=1e-5)
        assert model.get_submodule(path).factors_a["svd1"].shape[0] == 1


def test_linear_is_an_approximation_with_measured_error():
    model = _two_adapters(r=4)
    errors = lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "lin", method="linear")
    assert all(e > 0 for e in errors.values())  # cross terms
    with pytest.raises(ValueError, match="method 'linear' needs equal ranks"):
        lorafit.combine_adapters(_two_adapters(r=2), {"a": 1.0, "b": 1.0}, "lin", method="linear")


def test_bad_combinations_are_refused():
    model = _two_adapters(targets=["mlp.0", "mlp.2"])
    with pytest.raises(ValueError,
                       match=r"adapters 'a' and 'b' adapt different modules \(only 'a': \['conv1', 'conv2', 'embed'\]"):
        lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "ab")
    with pytest.raises(KeyError, match=r"no adapters named \['c'\]"):
        lorafit.combine_adapters(model, {"c": 1.0}, "x")
    with pytest.raises(ValueError, match="method must be one of"):
        lorafit.combine_adapters(model, {"a": 1.0}, "x", method="task_arithmetic")
    with pytest.raises(ValueError, match="method 'svd' needs rank >= 1"):
        lorafit.combine_adapters(model, {"a": 1.0}, "x", method="svd")
    lorafit.attach(model, LoraConfig(target_modules=["mlp.0"], use_dora=True), "d")
    with pytest.raises(ValueError, match=r"adapters \['d'\] are DoRA adapters \(use_dora\), whose learned magnitudes"):
        lorafit.combine_adapters(model, {"d": 1.0}, "x")


def test_combined_adapter_saves_and_reloads(tmp_path):
    model = _two_adapters()
    lorafit.combine_adapters(model, {"a": 1.0, "b": -1.0}, "ab")
    lorafit.set_active(model, "ab")
    inputs = mixed_inputs()
    expected = model(*inputs)
    lorafit.save_adapter(model, tmp_path, "ab")
    torch.manual_seed(0)
    fresh = lorafit.load_adapter(Mixed().eval(), tmp_path)
    torch.testing.assert_close(fresh(*inputs), expected, atol=1e-5, rtol=0)


# -- two tasks, each with its own head (of its own size) ------------------------------------


class _TaskNet(nn.Module):
    """A shared body and a classifier head with ``n_labels`` outputs."""

    def __init__(self, n_labels: int) -> None:
        super().__init__()
        torch.manual_seed(0)  # the same body for every task
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.classifier = nn.Linear(16, n_labels)

    def forward(self, x):
        return self.classifier(self.body(x))


def _task_adapter(tmp_path, name: str, n_labels: int, seed: int):
    model = _TaskNet(n_labels).eval()
    lorafit.attach(model, LoraConfig(r=2, lora_alpha=4, target_modules=["body.0", "body.2"],
                                     modules_to_save=["classifier"]), name)
    torch.manual_seed(seed)
    randomize_adapters(model, scale=0.3)
    with torch.no_grad():
        model.classifier.modules_to_save[name].weight.normal_()
    lorafit.save_adapter(model, tmp_path / name, name)
    return model


def test_task_adapters_with_heads_of_other_sizes_load_and_combine_into_one_model(tmp_path):
    x = torch.randn(5, 8)
    sentiment = _task_adapter(tmp_path, "sentiment", 2, seed=1)
    topic = _task_adapter(tmp_path, "topic", 4, seed=2)
    # one model, built for 2 labels, holds both adapters; the topic adapter brings its 4-output head
    model = _TaskNet(2).eval()
    lorafit.load_adapter(model, tmp_path / "sentiment", "sentiment")
    lorafit.load_adapter(model, tmp_path / "topic", "topic")
    assert model.classifier.modules_to_save["topic"].out_features == 4
    assert not any(p.requires_grad for p in model.parameters())  # loaded for inference, the new head too
    for name, alone in (("sentiment", sentiment), ("topic", topic)):
        lorafit.set_active(model, name)
        torch.testing.assert_close(model(x), alone(x), atol=1e-6, rtol=0)

    # the combined LoRA with each task's own head: both deltas in the body, that task's head on top
    for task, other in (("sentiment", "topic"), ("topic", "sentiment")):
        errors = lorafit.combine_adapters(model, {"sentiment": 1.0, "topic": 1.0}, f"both-{task}", heads=task)
        assert max(errors.values()) < 1e-6
        lorafit.set_active(model, f"both-{task}")
        combined = model(x)
        lorafit.set_active(model, [task, other])  # both factors active; the first named adapter's head runs
        torch.testing.assert_close(combined, model(x), atol=1e-5, rtol=0)
        head = model.classifier.modules_to_save[f"both-{task}"]
        assert head is not model.classifier.modules_to_save[task]  # a copy, not shared
        torch.testing.assert_close(head.weight, model.classifier.modules_to_save[task].weight, atol=0, rtol=0)
        # saved and reloaded into a fresh model, it is a complete adapter for that task
        lorafit.save_adapter(model, tmp_path / f"both-{task}", f"both-{task}")
        fresh = lorafit.load_adapter(_TaskNet(2).eval(), tmp_path / f"both-{task}")
        torch.testing.assert_close(fresh(x), combined, atol=1e-5, rtol=0)
    # without heads= the combined adapter keeps the model's original head
    lorafit.combine_adapters(model, {"sentiment": 1.0, "topic": 1.0}, "both")
    lorafit.set_active(model, "both")
    assert model(x).shape == (5, 2)


def test_heads_must_name_an_adapter_with_a_head_and_the_head_must_fit_the_body(tmp_path):
    _task_adapter(tmp_path, "sentiment", 2, seed=1)
    model = _TaskNet(2).eval()
    lorafit.load_adapter(model, tmp_path / "sentiment", "sentiment")
    lorafit.attach(model, LoraConfig(r=2, target_modules=["body.0", "body.2"]), "plain")
    with pytest.raises(KeyError, match=r"heads='nope': no such adapter is attached"):
        lorafit.combine_adapters(model, {"sentiment": 1.0, "plain": 1.0}, "x", heads="nope")
    with pytest.raises(ValueError, match=r"heads='plain': that adapter has no modules_to_save copies"):
        lorafit.combine_adapters(model, {"sentiment": 1.0, "plain": 1.0}, "x", heads="plain")
    assert "x" not in lorafit.adapter_configs(model)
    # only the number of outputs may differ: a head for another hidden size is refused, the model unchanged
    from safetensors.torch import load_file, save_file
    path = tmp_path / "sentiment" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.classifier.weight"] = torch.zeros(3, 12)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"classifier.weight' has shape \[3, 12\] in the file but the model needs "
                                         r"\[2, 16\]"):
        lorafit.load_adapter(model, tmp_path / "sentiment", "other")
    assert "other" not in lorafit.adapter_configs(model)


SPARSE = ["ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd"]


@pytest.mark.parametrize("method", ["ties_svd", "magnitude_prune_svd"])
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_ties_and_magnitude_pruning_give_pefts_merge(method, sign, tmp_path):
    """Two adapters saved by PEFT, merged by PEFT's add_weighted_adapter and by combine_adapters: the same merged
    adapter, so the same logits. (DARE's random draws: next test.)"""
    peft = pytest.importorskip("peft")
    from tests.models import tiny_llama

    ids = torch.tensor([[1, 5, 9, 13, 2, 40, 7, 3]])
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
                                 adapter_name="a")
    theirs.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets))
    randomize_adapters(theirs, scale=0.3)
    theirs.save_pretrained(tmp_path)  # in tmp_path/a and tmp_path/b
    ours = lorafit.load_adapter(tiny_llama(), tmp_path / "a", "a")
    lorafit.load_adapter(ours, tmp_path / "b", "b")

    theirs.add_weighted_adapter(["a", "b"], [0.8, 0.5], "ab", combination_type=method, svd_rank=3, density=0.4,
                                majority_sign_method=sign)
    errors = lorafit.combine_adapters(ours, {"a": 0.8, "b": 0.5}, "ab", method=method, rank=3, density=0.4,
                                      majority_sign_method=sign)
    assert all(0 <= e < 1 for e in errors.values())
    theirs.set_adapter("ab")
    lorafit.set_active(ours, "ab")
    with torch.no_grad():
        expected, got = theirs(input_ids=ids).logits, ours(input_ids=ids).logits
        with lorafit.disabled(ours):
            base = ours(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the merge changes the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "ties", "magnitude_prune"])
def test_each_merge_is_pefts_definition_draw_for_draw(kind):
    """lorafit.task_merging against PEFT's merge_utils on the same task vectors, DARE from the same seed."""
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    from lorafit.task_merging import merge_task_vectors

    torch.manual_seed(0)
    deltas, weights = [torch.randn(24, 40) for _ in range(3)], [0.8, -0.3, 0.5]
    peft_args = {"density": 0.3} | ({} if kind in ("dare_linear", "magnitude_prune") else
                                    {"majority_sign_method": "frequency"})
    torch.manual_seed(7)
    expected = getattr(merge_utils, kind)(deltas, torch.tensor(weights), **peft_args)
    got = merge_task_vectors(deltas, weights, kind, 0.3, "frequency", torch.Generator().manual_seed(7))
    torch.testing.assert_close(got, expected)


def test_sparsifying_keeps_density_and_ties_elects_one_sign_per_entry():
    from lorafit.task_merging import keep_largest, merge_task_vectors

    torch.manual_seed(0)
    d = torch.randn(40, 50)
    kept = keep_largest(d, 0.25)
    assert (kept != 0).sum() == 500 and kept.abs().min() == 0
    assert kept[kept != 0].abs().min() >= d.abs().flatten().kthvalue(1500).values
    # TIES: where the tasks disagree in sign, only the elected side is averaged
    one, two = torch.tensor([[3.0, -1.0]]), torch.tensor([[-1.0, -2.0]])
    merged = merge_task_vectors([one, two], [1.0, 1.0], "ties", density=1.0)
    torch.testing.assert_close(merged, torch.tensor([[3.0, -1.5]]))
    # DARE keeps the expected change: the mean of many draws approaches the plain sum
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([merge_task_vectors([d], [1.0], "dare_linear", 0.3, generator=g) for _ in range(400)])
    assert ((draws.mean(0) - d).abs().mean() / d.abs().mean()) < 0.15


def test_sparse_methods_need_rank_and_density():
    model = _two_adapters()
    with pytest.raises(ValueError, match=r"method 'ties_svd' needs rank >= 1"):
        lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "x", method="ties_svd", density=0.5)
    with pytest.raises(ValueError, match=r"needs density in \(0, 1\]"):
        lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "x", method="dare_ties_svd", rank=2)
    with pytest.raises(ValueError, match="density is only used by"):
        lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "x", density=0.5)
    with pytest.raises(ValueError, match="majority_sign_method must be one of"):
        lorafit.combine_adapters(model, {"a": 1.0, "b": 1.0}, "x", method="ties_svd", rank=2, density=0.5,
                                 majority_sign_method="mean")
    assert "x" not in lorafit.adapter_configs(model)
