"""trainable_token_indices: new values for a few rows of an embedding (and of a head tied to it)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorafit
from lorafit.layers import TiedTokens, TrainableTokens
from tests.models import rows_alone

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = [3, 7, 9]
# an untied head's own rows, for other tokens than the embedding's; a tied head named with the embedding's ids
UNTIED_HEAD = {"embed_tokens": TOKENS, "lm_head": [3, 11]}
TIED_HEAD = {"embed_tokens": TOKENS, "lm_head": TOKENS}
IDS = torch.tensor([[1, 3, 5, 7, 9, 9, 2], [7, 0, 3, 4, 8, 9, 6]])


def llama(tied: bool, dtype=torch.float32):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def gemma2():
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return transformers.Gemma2ForCausalLM(config).eval()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def new_rows(model, seed: int = 3, lora: bool = True):
    """Rows unlike the old ones, and (``lora``) LoRA factors with B != 0, so that the adapter changes the output."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "trainable_tokens_delta" in name or (lora and ".lora_" in name):
                p.normal_(std=1.0 if "trainable_tokens_delta" in name else 0.1)


@pytest.mark.parametrize("tied", [False, True])
def test_the_rows_replace_the_tokens_vectors_and_a_tied_head_scores_with_them(tied):
    # target_modules as in PEFT: unset, a model type's default (q_proj and v_proj for Llama)
    model = lorafit.attach(llama(tied), lorafit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
    assert isinstance(model.model.embed_tokens, TrainableTokens)
    assert isinstance(model.lm_head, TiedTokens) == tied
    rows = model.model.embed_tokens.rows["default"]
    torch.testing.assert_close(rows, llama(tied).model.embed_tokens.weight[TOKENS])  # they start as the old rows
    # a tied head scores the tokens with rows equal to the old ones: the same to rounding
    torch.testing.assert_close(logits(model), logits(llama(tied)), rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    with torch.no_grad():
        rows.normal_()  # the LoRA on q_proj stays zero: only the rows change the output
    reference = llama(tied)
    with torch.no_grad():
        reference.model.embed_tokens.weight[TOKENS] = rows  # tied: the head's weight too
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained[0] == "model.embed_tokens.token_adapter.trainable_tokens_delta.default"
    assert len(trained) == 5 and all("q_proj.lora_" in n for n in trained[1:])
    report = lorafit.trainable_parameters(model)
    assert report.trainable == report.adapter == len(TOKENS) * 32 + 2 * (8 * 32 + 32 * 8)


def test_an_untied_head_gets_rows_of_its_own_which_score_its_tokens():
    model = lorafit.attach(llama(False), lorafit.LoraConfig(target_modules=["q_proj"],
                                                            trainable_token_indices=UNTIED_HEAD))
    assert isinstance(model.model.embed_tokens, TrainableTokens) and isinstance(model.lm_head, TrainableTokens)
    torch.testing.assert_close(logits(model), logits(llama(False)), rtol=1e-6, atol=1e-6)
    new_rows(model, lora=False)
    reference = llama(False)
    with torch.no_grad():
        reference.model.embed_tokens.weight[TOKENS] = model.model.embed_tokens.rows["default"]
        reference.lm_head.weight[[3, 11]] = model.lm_head.rows["default"]
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "lm_head.token_adapter.trainable_tokens_delta.default" in trained
    # the new head rows learn from the loss at every position, the embedding's only where their tokens are
    model(IDS).logits.square().mean().backward()
    assert model.lm_head.rows["default"].grad.abs().min() > 0


@pytest.mark.parametrize("tied, tokens", [(False, TOKENS), (True, TOKENS), (False, UNTIED_HEAD), (True, TIED_HEAD)])
def test_peft_and_lorafit_read_each_others_files_with_the_same_logits_and_gradients(tied, tokens, tmp_path):
    config = dict(r=2, lora_alpha=4, target_modules=["q_proj"], trainable_token_indices=tokens)
    ours = lorafit.attach(llama(tied), lorafit.LoraConfig(**config))
    new_rows(ours)
    lorafit.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(llama(tied), tmp_path / "ours", is_trainable=True).eval()
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)

    grads = []
    for model in (ours, theirs):
        model(IDS).logits.square().mean().backward()
        grads.append({n.removeprefix("base_model.model.").replace(".default.weight", "").replace(".default", ""):
                      p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for key, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][key], rtol=1e-4, atol=1e-6, msg=key)

    made = peft.get_peft_model(llama(tied), peft.LoraConfig(**config, init_lora_weights=False))
    with torch.no_grad():
        for n, p in made.named_parameters():
            if "trainable_tokens_delta" in n:
                p.normal_()
    made.save_pretrained(tmp_path / "peft")
    loaded = lorafit.load_adapter(llama(tied), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded), logits(made.eval()), rtol=1e-5, atol=1e-5)


def test_scaled_embeddings_scale_the_new_rows_as_peft_does(tmp_path):
    ours = lorafit.attach(gemma2(), lorafit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
    new_rows(ours)
    lorafit.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(gemma2(), tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)
    assert logits(ours).sub(logits(gemma2())).abs().max() > 1e-3


@pytest.mark.parametrize("tied, tokens", [(False, TOKENS), (True, TOKENS), (False, UNTIED_HEAD)])
def test_merge_unmerge_disabled_unload_and_reload(tied, tokens, tmp_path):
    base = llama(tied, torch.bfloat16)
    before = {n: p.clone() for n, p in base.named_parameters()}
    # a LoRA with B = 0 beside the rows: merged or not, it adds exactly nothing
    model = lorafit.attach(llama(tied, torch.bfloat16), lorafit.LoraConfig(target_modules=["q_proj"],
                                                                           trainable_token_indices=tokens))
    new_rows(model, lora=False)
    unmerged = logits(model)
    lorafit.merge(model)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=0)
    with lorafit.disabled(model):
        torch.testing.assert_close(logits(model), logits(base), rtol=0, atol=0)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=0)
    lorafit.unmerge(model)
    torch.testing.assert_close(logits(model), unmerged, rtol=0, atol=0)
    lorafit.save_adapter(model, tmp_path)
    keys = json.loads((tmp_path / "adapter_config.json").read_text())["trainable_token_indices"]
    assert keys == tokens
    fresh = lorafit.load_adapter(llama(tied, torch.bfloat16), tmp_path)
    torch.testing.assert_close(logits(fresh), unmerged, rtol=0, atol=0)
    plain = lorafit.merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(m, (TrainableTokens, TiedTokens)) for m in plain.modules())
    torch.testing.assert_close(logits(plain), unmerged, rtol=0, atol=0)
    lorafit.unload(model)
    assert type(model.model.embed_tokens).__name__ == "Embedding" and type(model.lm_head).__name__ == "Linear"
    after = dict(model.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_two_adapters_with_their_own_tokens():
    model = llama(True)
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[3, 7]), name="a")
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [9]}),
                   name="b")
    new_rows(model, lora=False)
    lorafit.set_active(model, ["a", "b"])
    reference = llama(True)
    with torch.no_grad():
        reference.model.embed_tokens.weight[[3, 7]] = model.model.embed_tokens.rows["a"]
        reference.model.embed_tokens.weight[[9]] = model.model.embed_tokens.rows["b"]
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[7]), name="c")
    lorafit.set_active(model, ["a", "c"])
    with pytest.raises(ValueError, match="adapters 'a' and 'c' both train token 7"):
        logits(model)
    for name in ("a", "b", "c"):
        lorafit.detach(model, name)
    assert type(model.lm_head).__name__ == "Linear"
    torch.testing.assert_close(logits(model), logits(llama(True)), rtol=0, atol=0)


@pytest.mark.parametrize("config, message", [
    ({"trainable_token_indices": [3, 3]}, r"trainable_token_indices names a token twice"),
    ({"trainable_token_indices": []}, r"trainable_token_indices must be a non-empty list of token ids"),
    ({"trainable_token_indices": {"embed_tokens": [-1]}}, r"trainable_token_indices\['embed_tokens'\] must be"),
])
def test_bad_configs_name_the_field(config, message):
    with pytest.raises(ValueError, match=message):
        lorafit.LoraConfig(**config)


def test_refusals_leave_the_model_as_it_was():
    model = llama(True)
    with pytest.raises(ValueError, match=r"\[50, 51\] are not rows of this Embedding \(50 tokens\)"):
        lorafit.attach(model, lorafit.LoraConfig(trainable_token_indices=[1, 50, 51]))
    with pytest.raises(ValueError, match="names 'wte', which matches no embedding or output head"):
        lorafit.attach(model, lorafit.LoraConfig(trainable_token_indices={"wte": [1]}))
    with pytest.raises(ValueError, match="matched by target_modules and by target_parameters or trainable_token"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["embed_tokens"], trainable_token_indices=[1]))
    assert type(model.model.embed_tokens).__name__ == "Embedding" and type(model.lm_head).__name__ == "Linear"
    tied = r"'lm_head' shares its weight with 'model.embed_tokens' \(tied embeddings\)"
    for tokens in ({"lm_head": [1]}, {"embed_tokens": [1], "lm_head": [2]}):
        with pytest.raises(ValueError, match=tied):
            lorafit.attach(model, lorafit.LoraConfig(trainable_token_indices=tokens))
    # a LoRA on a tied head would score the tokens with the old rows: refused in either order
    with pytest.raises(ValueError, match=f"{tied} and carries a LoRA adapter, so it cannot use the tokens' new rows"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["lm_head"], trainable_token_indices=[1]))
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["lm_head"]), name="lora")
    with pytest.raises(ValueError, match="and carries a LoRA adapter"):
        lorafit.attach(model, lorafit.LoraConfig(trainable_token_indices=[1]), name="b")
    lorafit.detach(model, "lora")
    assert type(model.model.embed_tokens).__name__ == "Embedding" and type(model.lm_head).__name__ == "Linear"
    lorafit.attach(model, lorafit.LoraConfig(trainable_token_indices=[1]), name="a")
    with pytest.raises(ValueError, match="target_modules matches 'lm_head', whose token rows an adapter trains"):
        lorafit.attach(model, lorafit.LoraConfig(target_modules=["lm_head"]), name="lora")
    with pytest.raises(ValueError, match=r"adapters \['a'\] train token rows"):
        lorafit.combine_adapters(model, {"a": 1.0}, "c")
    lorafit.merge(model, "a")
    with pytest.raises(ValueError, match=r"adapters \['a'\] are merged into the weights"):
        with lorafit.adapter_per_row(model, ["a", None]):
            pass
    lorafit.unmerge(model)
    with lorafit.adapter_per_row(model, [None, None]):  # rows without token adapters run the base layers
        torch.testing.assert_close(logits(model), logits(llama(True)), rtol=0, atol=0)


def test_lorafit_train_trains_the_rows_and_saves_them(tmp_path):
    from lorafit.train import train
    from tests.test_train_support import instruction_setup

    config = instruction_setup(tmp_path, 32, lora='r = 4\nlora_alpha = 8\ntarget_modules = ["q_proj"]\n'
                                                  'trainable_token_indices = {embed_tokens = [3, 4, 5]}',
                               train="epochs = 2\nbatch_size = 8\nlr = 1e-2")
    result = train(config, {"train.num_threads": 1}, progress=False)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    old = base.model.embed_tokens.weight[[3, 4, 5]].detach().clone()
    fresh = lorafit.load_adapter(base.eval(), tmp_path / "run" / "adapter")
    assert not torch.allclose(fresh.model.embed_tokens.rows["default"], old)  # the rows trained
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.testing.assert_close(logits(fresh, ids), logits(result.model.eval(), ids), rtol=1e-5, atol=1e-5)


def test_the_model_can_move_after_attaching(tmp_path):
    """The rows to restore on unmerge are a buffer, and indices are rebuilt on the weight's device: attaching on
    one device (or dtype) and moving the model afterwards works."""
    model = lorafit.attach(llama(True), lorafit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS))
    new_rows(model, lora=False)
    model.to(torch.float64)
    assert model.model.embed_tokens.original_rows_default.dtype == torch.float64
    want = logits(model)
    lorafit.merge(model)
    torch.testing.assert_close(logits(model), want, rtol=1e-12, atol=1e-12)
    lorafit.unmerge(model)
    torch.testing.assert_close(model.model.embed_tokens.weight, llama(True).double().model.embed_tokens.weight,
                               rtol=0, atol=0)
    assert "original_rows_default" not in " ".join(model.state_dict())


def encoder_decoder(kind: str):
    """BART (scaled embeddings) or T5: one shared table, which the encoder's and decoder's embeddings and the
    head hold too; the model computes with those, never with the shared module itself."""
    torch.manual_seed(0)
    if kind == "bart":
        config = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1,
                                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                         decoder_ffn_dim=32, scale_embedding=True, max_position_embeddings=32)
        return transformers.BartForConditionalGeneration(config).eval()
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    return transformers.T5ForConditionalGeneration(config).eval()


def seq2seq_logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, decoder_input_ids=IDS).logits


@pytest.mark.parametrize("kind", ["bart", "t5"])
def test_a_shared_table_s_rows_reach_every_module_that_holds_it(kind, tmp_path):
    theirs = peft.get_peft_model(encoder_decoder(kind), peft.LoraConfig(
        target_modules=["q_proj" if kind == "bart" else "q"], trainable_token_indices=TOKENS))
    new_rows(theirs, lora=False)
    theirs.save_pretrained(tmp_path)
    expected = seq2seq_logits(theirs)
    assert expected.sub(seq2seq_logits(encoder_decoder(kind))).abs().max() > 1e-2
    ours = lorafit.load_adapter(encoder_decoder(kind), tmp_path)
    tied = [n for n, m in ours.named_modules() if isinstance(m, TiedTokens)]
    assert sorted(tied) == sorted([f"{'model.' if kind == 'bart' else ''}{part}.embed_tokens"
                                   for part in ("encoder", "decoder")] + ["lm_head"])
    torch.testing.assert_close(seq2seq_logits(ours), expected, rtol=1e-5, atol=1e-5)
    lorafit.merge(ours)
    torch.testing.assert_close(seq2seq_logits(ours), expected, rtol=1e-5, atol=1e-5)
    plain = lorafit.unload(ours)
    torch.testing.assert_close(seq2seq_logits(plain), seq2seq_logits(encoder_decoder(kind)), rtol=0, atol=0)
    assert not any(isinstance(m, (TrainableTokens, TiedTokens)) for m in plain.modules())


@pytest.mark.parametrize("tied", [True, False])
def test_adapter_per_row_uses_each_row_s_token_rows(tied):
    """Rows on adapters with different token rows (on the embedding, a tied head scoring with them, or an untied
    head's own rows), a plain LoRA adapter and the base model, in one batch: each row as alone."""
    model = llama(tied)
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=TOKENS), "a")
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"], trainable_token_indices=(
        TOKENS[:2] if tied else {"embed_tokens": [9, 11], "lm_head": [3, 4, 5]})), "b")
    lorafit.attach(model, lorafit.LoraConfig(target_modules=["q_proj"]), "plain")
    new_rows(model)
    rows = ["a", "b", None, "plain", "b", "a"]
    ids = IDS.repeat(3, 1)
    with torch.no_grad():
        with lorafit.adapter_per_row(model, rows):
            mixed = model(ids).logits
        alone = rows_alone(model, rows, lambda k: model(ids[k:k + 1]).logits)
        torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    lorafit.set_active(model, "a")
    assert logits(model).sub(logits(llama(tied))).abs().max() > 1e-2  # the rows matter
