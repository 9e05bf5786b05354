"""`lorafit demo` and `lorafit inspect`: the numbers the demo claims, and the CLI's exit codes."""

import subprocess
import sys

import pytest

pytest.importorskip("sklearn")

from lorafit.cli import main  # noqa: E402
from lorafit.demo import format_report, run_demo  # noqa: E402

RANK = 8


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo") / "adapter"


@pytest.fixture(scope="module")
def results(adapter_dir):
    # 15 epochs: LoRA starts from B = 0 and needs ~150 steps to pass 0.9 on every seed we tried (0-3).
    return run_demo(rank=RANK, epochs=15, seed=0, out=adapter_dir)


def test_base_knows_only_old_digits(results):
    base = results["rows"]["base"]
    assert base["old"] > 0.9
    assert base["new"] < 0.1  # never saw a 5-9: its head never predicts them


def test_lora_learns_new_digits_with_fewer_parameters(results):
    lora, full = results["rows"]["lora"], results["rows"]["full"]
    assert lora["before"] == results["rows"]["base"]["new"]  # B = 0: attaching changes nothing
    assert lora["new"] > 0.8 and full["new"] > 0.8  # chance is 0.2 among 5-9
    assert lora["trainable"] < full["trainable"]
    assert lora["state"] < full["state"]
    assert full["trainable"] == full["total"] == results["base_params"]


def test_disabled_adapter_gives_back_the_base(results):
    assert results["disabled_acc"] == results["base_acc"]


def test_reload_and_merge_keep_accuracy(results):
    assert results["reload_acc"] == results["lora_acc"]
    assert results["reload_max_logit_diff"] == 0.0  # same tensors, same code path: bitwise equal
    assert results["merged_acc"] == results["lora_acc"]
    assert results["merged_max_logit_diff"] < 1e-4  # W + sBA vs Wx + sB(Ax): rounding only
    assert results["merged_params"] == results["base_params"]
    assert not results["merged_has_lora"]


def test_report_is_a_plain_table(results):
    text = format_report(results)
    assert f"LoRA r={RANK}" in text and "full fine-tuning" in text
    assert "identical" in text and "DIFFERENT" not in text
    assert "ru_maxrss" in text or "cuda" in text  # says how memory was measured
    assert "\x1b[" not in text  # no terminal colour codes


def test_inspect_prints_config_and_tensors(results, adapter_dir, capsys):
    assert results["adapter_kept"] and (adapter_dir / "adapter_model.safetensors").is_file()
    assert main(["inspect", str(adapter_dir)]) == 0
    out = capsys.readouterr().out
    assert f"r: {RANK}" in out and f"lora_alpha: {2 * RANK}" in out
    assert "target_modules: fc1, fc2, head" in out
    assert "base_model.model.fc1.lora_A.weight" in out and f"[{RANK}, 64]" in out and "float32" in out
    assert f"{results['rows']['lora']['trainable']:,} parameters" in out


def test_inspect_names_what_the_adapter_is_beyond_a_plain_lora(tmp_path, capsys):
    from tests.models import tiny_llama

    import lorafit

    model = tiny_llama()
    lorafit.attach(model, lorafit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                             init_lora_weights="gaussian"))
    lorafit.save_adapter(model, tmp_path / "dora")
    assert main(["inspect", str(tmp_path / "dora")]) == 0
    out = capsys.readouterr().out
    assert "use_dora: True" in out and "init_lora_weights: 'gaussian'" in out and "kasa_config" not in out
    assert ".lora_magnitude_vector" in out


def test_inspect_counts_a_long_list_of_modules_by_layer_name(tmp_path, capsys):
    from tests.models import tiny_llama

    import lorafit

    model = tiny_llama()  # 2 layers: all-linear records 14 modules by their full names
    lorafit.attach(model, lorafit.LoraConfig(r=2, target_modules="all-linear"))
    lorafit.save_adapter(model, tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "target_modules: 14 modules: q_proj x2, k_proj x2, v_proj x2, o_proj x2, gate_proj x2, up_proj x2, " \
           "down_proj x2\n" in out


def test_inspect_bad_directory_exits_2_in_process(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "missing")]) == 2
    assert main(["inspect", str(tmp_path)]) == 2  # exists, but holds no adapter_config.json
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("lorafit: error: ") for line in err)


def test_inspect_missing_directory_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lorafit.cli", "inspect", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr


def test_help_and_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "demo" in capsys.readouterr().out
    for argv in (["demo", "--rank", "0"], ["demo", "--device", "no-such-device"], []):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
