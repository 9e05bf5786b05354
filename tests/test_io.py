import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lorafit
from lorafit import LoraConfig
from lorafit.io import CONFIG_NAME, WEIGHTS_NAME
from lorafit.layers import LoraLayer
from tests.models import ALL_KINDS, Mixed, mixed_inputs, randomize_adapters


def _trained(tmp_path, **kw):
    torch.manual_seed(0)
    base = Mixed().eval()
    model = copy.deepcopy(base)
    kw.setdefault("target_modules", ALL_KINDS)
    lorafit.attach(model, LoraConfig(r=4, lora_alpha=8, **kw))
    randomize_adapters(model)
    path = tmp_path / "adapter"
    lorafit.save_adapter(model, path)
    return base, model, path


def test_save_writes_peft_layout(tmp_path):
    _, model, path = _trained(tmp_path, modules_to_save=["classifier"])
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    with safe_open(path / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
    assert "base_model.model.mlp.0.lora_A.weight" in keys
    assert "base_model.model.conv2.lora_B.weight" in keys
    assert "base_model.model.embed.lora_embedding_A" in keys
    assert "base_model.model.classifier.weight" in keys and "base_model.model.classifier.bias" in keys
    assert not any("default" in k for k in keys)
    assert json.loads((path / CONFIG_NAME).read_text())["r"] == 4


def test_reload_gives_same_outputs(tmp_path):
    base, model, path = _trained(tmp_path, modules_to_save=["classifier"])
    with torch.no_grad():
        model.classifier.modules_to_save["default"].weight.mul_(2)
    lorafit.save_adapter(model, path)
    inputs = mixed_inputs()
    loaded = lorafit.load_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(loaded(*inputs), model(*inputs), atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable = lorafit.load_adapter(copy.deepcopy(base), path, trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_second_adapter_loads_beside_the_first(tmp_path):
    base, model, path = _trained(tmp_path)
    other = lorafit.load_adapter(copy.deepcopy(base), path, name="first")
    lorafit.load_adapter(other, path, name="second", activate=False)
    assert lorafit.active_adapters(other) == ["first"]
    inputs = mixed_inputs()
    lorafit.set_active(other, "second")
    torch.testing.assert_close(other(*inputs), model(*inputs), atol=1e-6, rtol=0)


def test_interrupted_save_keeps_the_old_adapter(tmp_path, monkeypatch):
    base, model, path = _trained(tmp_path)
    good = (path / WEIGHTS_NAME).read_bytes()
    randomize_adapters(model, scale=1.0)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("lorafit.io.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        lorafit.save_adapter(model, path)
    assert (path / WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp file left
    lorafit.load_adapter(copy.deepcopy(base), path)


def test_pickle_is_refused(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "target_modules": ["mlp.0"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ValueError, match=r"holds adapter_model.bin, a pickle file, which can run arbitrary code"):
        lorafit.load_adapter(Mixed(), tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lorafit.load_adapter(Mixed(), tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="adapter_config.json is missing"):
        lorafit.load_adapter(Mixed(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "target_modules": ["mlp.0"]}))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        lorafit.load_adapter(Mixed(), tmp_path)


def test_corrupt_weights_are_reported(tmp_path):
    base, _, path = _trained(tmp_path)
    (path / WEIGHTS_NAME).write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="adapter_model.safetensors is not a readable safetensors file"):
        lorafit.load_adapter(base, path)


def _rewrite(path, change):
    with safe_open(path / WEIGHTS_NAME, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    base, _, path = _trained(tmp_path)
    _rewrite(path, lambda t: t.__setitem__("base_model.model.mlp.0.lora_A.weight", torch.zeros(4, 13)))
    untouched = copy.deepcopy(base)
    with pytest.raises(ValueError) as info:
        lorafit.load_adapter(base, path)
    msg = str(info.value)
    assert ("tensor 'base_model.model.mlp.0.lora_A.weight' has shape [4, 13] in the file but the model needs "
            "[4, 12]") in msg
    assert "another base model" in msg
    # the failed load left the model as it was
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    assert str(base) == str(untouched)
    assert lorafit.adapter_configs(base) == {}


def test_missing_and_extra_tensors_are_named(tmp_path):
    base, _, path = _trained(tmp_path)

    def change(t):
        del t["base_model.model.conv1.lora_B.weight"]
        t["base_model.model.decoder.lora_A.weight"] = torch.zeros(4, 4)

    _rewrite(path, change)
    with pytest.raises(ValueError) as info:
        lorafit.load_adapter(base, path)
    msg = str(info.value)
    assert "missing tensors ['base_model.model.conv1.lora_B.weight']" in msg
    assert "tensors that match no adapted module of this model ['base_model.model.decoder.lora_A.weight']" in msg


def test_adapter_for_other_targets_fails_cleanly(tmp_path):
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    save_file({"x": torch.zeros(1)}, tmp_path / WEIGHTS_NAME)
    with pytest.raises(ValueError, match=r"target_modules \['q_proj'\] matched no adaptable module"):
        lorafit.load_adapter(Mixed(), tmp_path)


def test_save_unknown_adapter(tmp_path):
    with pytest.raises(KeyError, match="no adapter named 'default' to save"):
        lorafit.save_adapter(Mixed(), tmp_path)


def test_bias_all_round_trip(tmp_path):
    base, model, path = _trained(tmp_path, bias="all", target_modules=["mlp.0"])
    with torch.no_grad():
        model.mlp[0].base_layer.bias.add_(1.0)
        model.classifier.bias.add_(1.0)
    lorafit.save_adapter(model, path)
    with safe_open(path / WEIGHTS_NAME, "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.mlp.0.base_layer.bias" in keys and "base_model.model.classifier.bias" in keys
    loaded = lorafit.load_adapter(copy.deepcopy(base), path)
    inputs = mixed_inputs()
    torch.testing.assert_close(loaded(*inputs), model(*inputs), atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_export_as_plain_lora_of_the_original_weights(tmp_path, init):
    torch.manual_seed(0)
    original = Mixed().eval()
    model = copy.deepcopy(original)
    lorafit.attach(model, LoraConfig(r=3, lora_alpha=6, init_lora_weights=init,
                                     target_modules=["mlp.0", "mlp.2", "proj"],
                                     rank_pattern={"proj": 2}, alpha_pattern={"mlp.2": 1}))
    with torch.no_grad():  # "training"
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    inputs = mixed_inputs()
    trained = model(*inputs)
    lorafit.save_adapter(model, tmp_path / "plain", as_plain_lora=True)
    cfg = json.loads((tmp_path / "plain" / CONFIG_NAME).read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 6
    loaded = lorafit.load_adapter(copy.deepcopy(original), tmp_path / "plain")
    assert loaded.proj.lora_A["default"].shape[0] == 4
    torch.testing.assert_close(loaded(*inputs), trained, atol=1e-5, rtol=0)


def test_plain_export_needs_a_pissa_adapter(tmp_path):
    _, model, _ = _trained(tmp_path)
    with pytest.raises(ValueError, match="as_plain_lora is for PiSSA/OLoRA/CorDA/LoRA-GA adapters"):
        lorafit.save_adapter(model, tmp_path / "x", as_plain_lora=True)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_unless_allowed(tmp_path, value):
    base, _, path = _trained(tmp_path)
    key = "base_model.model.mlp.0.lora_B.weight"
    _rewrite(path, lambda t: t[key].view(-1).__setitem__(3, value))
    untouched = copy.deepcopy(base)
    with pytest.raises(ValueError, match=rf"tensors \['{key}'\] hold NaN or infinite values.*allow_non_finite=True"):
        lorafit.load_adapter(base, path)
    assert str(base) == str(untouched) and lorafit.adapter_configs(base) == {}
    loaded = lorafit.load_adapter(base, path, allow_non_finite=True)
    assert not torch.isfinite(lorafit.adapter_state_dict(loaded)[key]).all()


def test_files_rewritten_after_reading_cannot_crash_the_process(tmp_path):
    """The tensors read are in memory, not a map of the file: truncating the file afterwards (a `cp`
    over it) does not kill the process with SIGBUS when they are used."""
    _, _, path = _trained(tmp_path)
    script = (f"import os, lorafit\nconfig, tensors = lorafit.read_adapter({str(path)!r})\n"
              f"os.truncate({str(path / WEIGHTS_NAME)!r}, 0)\nprint(sum(float(t.sum()) for t in tensors.values()))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


def test_adapter_in_memory_loads_like_its_directory(tmp_path):
    base, model, path = _trained(tmp_path, modules_to_save=["classifier"])
    config, tensors = lorafit.parse_adapter(*lorafit.read_adapter_files(path))
    loaded = lorafit.load_adapter_state(copy.deepcopy(base), config, tensors, "mine")
    inputs = mixed_inputs()
    torch.testing.assert_close(loaded(*inputs), model(*inputs), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="somewhere/adapter_model.safetensors is not a readable safetensors"):
        lorafit.parse_adapter(b"{}", b"garbage", source="somewhere")


def test_saved_files_get_the_usual_modes_not_tempfiles_private_ones(tmp_path):
    """A teammate or a server running as another user can read what lorafit writes: 0666 / 0777 less the
    umask, as open() and mkdir() give, not tempfile's 0600 / 0700."""
    import os
    import stat

    from lorafit.train.checkpoint import publish_dir

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules=["0"]))
    lorafit.save_adapter(model, tmp_path / "adapter")
    publish_dir(lambda d: (d / "x.txt").write_text("x"), tmp_path / "published")
    assert lorafit.io._UMASK == os.umask(lorafit.io._UMASK)  # the umask read at import is this process's
    for path in (tmp_path / "adapter").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~lorafit.io._UMASK, path
    assert stat.S_IMODE((tmp_path / "published").stat().st_mode) == 0o777 & ~lorafit.io._UMASK
