import json
import warnings

import pytest

from lorafit import LoraConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be an integer >= 1, got 0"),
        ({"r": 2.5}, "r must be an integer >= 1"),
        ({"r": True}, "r must be an integer >= 1"),
        ({"lora_alpha": 0}, "lora_alpha must be a finite number > 0"),
        ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0"),
        ({"lora_dropout": 1.0}, "lora_dropout must be a number with 0 <= lora_dropout < 1, got 1.0"),
        ({"lora_dropout": -0.1}, "0 <= lora_dropout < 1"),
        ({"init_lora_weights": "xavier"}, "init_lora_weights must be one of True, False, 'gaussian', 'orthogonal', "
                                          "'nora', 'pissa', 'olora', 'eva', 'loftq', 'corda', 'lora_ga', 'mica' or "
                                          "'pissa_niter_N', got 'xavier'"),
        ({"init_lora_weights": 1}, "init_lora_weights must be one of"),
        ({"bias": "some"}, "bias must be one of 'none', 'all', 'lora_only', got 'some'"),
        ({"target_modules": []}, "target_modules must be a non-empty list"),
        ({"target_modules": "(unclosed"}, "target_modules is not a valid regular expression"),
        ({"exclude_modules": [3]}, "exclude_modules must be a non-empty list"),
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list of module names"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern['q'] must be an integer >= 1"),
        ({"alpha_pattern": {"q": -1}}, "alpha_pattern['q'] must be a finite number > 0"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern key '(' is not a valid regular expression"),
        ({"layers_to_transform": [-1]}, "layers_to_transform must be a layer index >= 0"),
        ({"layers_to_transform": 1, "target_modules": "q.*"}, "layers_to_transform cannot be combined with a regex"),
        ({"layers_pattern": "layers"}, "layers_pattern is only meaningful together with layers_to_transform"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
        ({"use_dora": "yes"}, "use_dora must be true or false"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as info:
        LoraConfig(**kwargs)
    assert message in str(info.value)


def test_scale_rank_and_alpha_patterns():
    cfg = LoraConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 4}, alpha_pattern={r"layers\.1\..*v_proj": 2})
    assert cfg.rank_for("model.layers.0.self_attn.q_proj") == 4
    assert cfg.rank_for("model.layers.0.self_attn.v_proj") == 8
    assert cfg.alpha_for("model.layers.1.self_attn.v_proj") == 2
    assert cfg.alpha_for("model.layers.0.self_attn.v_proj") == 16
    assert cfg.scale_for("model.layers.0.self_attn.v_proj") == 2.0
    assert cfg.scale_for("model.layers.0.self_attn.q_proj") == 4.0
    # a pattern matches at a dot boundary only: "q_proj" does not match "xq_proj"
    assert cfg.rank_for("model.xq_proj") == 8
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scale_for("x") == pytest.approx(2.0)


def test_json_round_trip(tmp_path):
    cfg = LoraConfig(
        r=4, lora_alpha=32, lora_dropout=0.1, target_modules=["q", "v"], modules_to_save=["classifier"],
        rank_pattern={"q": 2}, alpha_pattern={"v": 8}, use_rslora=True, layers_to_transform=[0, 1],
        layers_pattern="layer", task_type="SEQ_CLS", init_lora_weights="gaussian",
    )
    path = tmp_path / "adapter_config.json"
    cfg.save(path)
    data = json.loads(path.read_text())
    assert data["peft_type"] == "LORA" and data["use_dora"] is False
    assert LoraConfig.load(path) == cfg


def test_tuple_and_set_targets_are_normalised():
    assert LoraConfig(target_modules={"v", "q"}).target_modules == ["q", "v"]
    assert LoraConfig(layers_to_transform=(1, 2)).layers_to_transform == [1, 2]


def test_unknown_keys_warn_not_fail():
    with pytest.warns(UserWarning, match=r"ignoring unknown keys \['brand_new_option'\]"):
        cfg = LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "brand_new_option": 1, "revision": None})
    assert cfg.r == 4


def test_peft_bookkeeping_keys_are_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraConfig.from_dict({"peft_type": "LORA", "r": 4, "auto_mapping": None, "use_dora": False,
                              "megatron_config": None, "astra_config": None, "peft_version": "0.22.0"})


def test_features_lorafit_lacks_are_refused_not_ignored():
    with pytest.raises(ValueError, match="use_qalora=True uses a PEFT feature lorafit does not implement"):
        LoraConfig.from_dict({"peft_type": "LORA", "use_qalora": True})
    with pytest.raises(ValueError, match="astra_config=.*uses a PEFT feature lorafit does not implement"):
        LoraConfig.from_dict({"peft_type": "LORA", "init_lora_weights": "astra", "astra_config": {"verbose": False}})
    assert LoraConfig().to_dict()["peft_version"] == "0.22.0"  # how PEFT >= 0.22 reads the file (lorafit.io)
    with pytest.raises(ValueError, match="peft_type is 'IA3'"):
        LoraConfig.from_dict({"peft_type": "IA3"})


def test_loaded_bad_value_names_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"peft_type": "LORA", "r": -2}))
    with pytest.raises(ValueError, match=r"adapter_config.json: r must be an integer >= 1, got -2"):
        LoraConfig.load(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        LoraConfig.load(path)
