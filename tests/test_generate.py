"""K samples per prompt: shared prefill is exact, greedy equals HF generate, seeded sampling, stops, tool calls."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain import chat
from posttrain import generate as G
from posttrain.tokenizer import EOM, EOT, PYTHON_TAG

STOPS = [128001, 128008, 128009]
SHORT = [{"role": "user", "content": "Hi"}]
LONG = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three prime numbers larger than ten, and say why each one is prime."}]
MEDIUM = [{"role": "user", "content": "What is 12 + 30?"}]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, llama3_tokenizer):
    from posttrain.backbone import load_model

    return load_model(tiny_model_dir, dtype=torch.float32).eval(), llama3_tokenizer


def _ids(messages, tokenizer):
    return chat.render(messages, tokenizer, add_generation_prompt=True).ids


def _freqs(tokens: torch.Tensor, vocab: int) -> list[float]:
    return (torch.bincount(tokens, minlength=vocab).float() / len(tokens)).tolist()


def test_sampling_follows_softmax_with_temperature_and_top_p():
    rows = 20_000
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(rows, 4)
    keys = G.row_keys(list(range(rows)), 1, torch.device("cpu"))
    plain = _freqs(G.sample_tokens(logits, keys, 0, 1.0, 1.0), 4)
    assert plain == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.015)
    # temperature 0.5 squares the probabilities: [.25, .09, .0225, .0025] / .365
    cold = _freqs(G.sample_tokens(logits, keys, 0, 0.5, 1.0), 4)
    assert cold == pytest.approx([0.6849, 0.2466, 0.0616, 0.0068], abs=0.015)
    # top_p 0.7 keeps tokens 0 and 1 (the mass before token 2 is 0.8 >= 0.7): [.5, .3] / .8
    nucleus = _freqs(G.sample_tokens(logits, keys, 0, 1.0, 0.7), 4)
    assert nucleus[2:] == [0.0, 0.0]
    assert nucleus[:2] == pytest.approx([0.625, 0.375], abs=0.015)
    assert G.sample_tokens(logits[:3], keys[:3], 0, 0.0, 1.0).tolist() == [0, 0, 0]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_a_row_draws_the_same_token_whatever_rows_share_its_chunk(monkeypatch, top_p):
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(0)) * 3
    keys = G.row_keys(list(range(7)), 1, torch.device("cpu"))
    alone = torch.cat([G.sample_tokens(logits[i:i + 1], keys[i:i + 1], 4, 0.8, top_p) for i in range(7)])
    assert G.sample_tokens(logits, keys, 4, 0.8, top_p).tolist() == alone.tolist()  # one chunk of 7 rows
    monkeypatch.setattr(G, "SAMPLE_ELEMENTS", 100)  # chunks of 2 rows, the last one short
    assert G.sample_tokens(logits, keys, 4, 0.8, top_p).tolist() == alone.tolist()
    assert len(set(alone.tolist())) > 1


def test_random_draws_depend_only_on_key_and_step():
    keys = G.row_keys([7, 8, 9], 2, torch.device("cpu"))
    alone = G.row_keys([8], 2, torch.device("cpu"))
    assert keys[2:4].tolist() == alone.tolist()
    assert len(set(keys.tolist())) == 6
    assert G.uniforms(keys, 5)[2:4].tolist() == G.uniforms(alone, 5).tolist()
    assert G.uniforms(keys, 5).tolist() != G.uniforms(keys, 6).tolist()


@pytest.mark.parametrize("static", [False, True])
def test_shared_prefill_equals_a_full_forward_per_sample(tiny, static):
    model, tok = tiny
    prompts = [_ids(SHORT, tok), _ids(LONG, tok)]
    assert len(prompts[0]) < len(prompts[1])  # so the first prompt is left-padded
    k, new_tokens = 3, torch.tensor([11, 22, 33, 44, 55, 66])
    with torch.inference_mode():
        state = G.prefill(model, prompts, tok.pad_token_id, length_multiple=64 if static else 1)
        cache, mask, lengths = G.share_prefill(state, k, 4, static=static, config=model.config)
        width = state.attention_mask.shape[1]
        mask[:, width] = 1
        mask = mask if static else mask[:, :width + 1]
        step_logits = G.decode_step(model, new_tokens[:, None], lengths[:, None], mask, cache)
        for row in range(len(new_tokens)):
            prompt = prompts[row // k]
            first = model(torch.tensor([prompt])).logits[0, -1]  # the K copies share the prompt's prefill logits
            torch.testing.assert_close(state.logits.repeat_interleave(k, 0)[row], first, atol=1e-5, rtol=1e-5)
            second = model(torch.tensor([prompt + [int(new_tokens[row])]])).logits[0, -1]
            torch.testing.assert_close(step_logits[row], second, atol=1e-5, rtol=1e-5)
    assert lengths.tolist() == [len(prompts[0])] * k + [len(prompts[1])] * k
    if static:  # the prompt's own cache is released once the static cache holds its copies
        assert all(layer.keys is None and layer.values is None for layer in state.cache.layers)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_equals_hf_generate(tiny, cache):
    model, tok = tiny
    prompts = [SHORT, LONG, MEDIUM]
    ours = G.generate(model, tok, prompts, k=2, temperature=0.0, max_new_tokens=10, batch_size=6, cache=cache,
                      progress=False)
    for messages, completions in zip(prompts, ours):
        ids = torch.tensor([_ids(messages, tok)])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                             eos_token_id=STOPS, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        assert [c.token_ids for c in completions] == [ref, ref]
        assert completions[0].num_tokens == 10 and completions[0].stop_reason == "length"


def test_same_seed_same_samples_whatever_the_batch(tiny):
    model, tok = tiny
    kwargs = dict(k=3, temperature=1.0, max_new_tokens=6, progress=False)
    full = G.generate(model, tok, [SHORT, LONG, MEDIUM], seed=[1, 2, 3], batch_size=9, **kwargs)
    alone = G.generate(model, tok, [LONG], seed=[2], batch_size=3, **kwargs)  # other batch, same seed
    other = G.generate(model, tok, [SHORT, LONG, MEDIUM], seed=[4, 5, 6], batch_size=9, **kwargs)
    tokens = [[c.token_ids for c in group] for group in full]
    assert tokens[1] == [c.token_ids for c in alone[0]]
    assert tokens != [[c.token_ids for c in group] for group in other]
    assert all(len({tuple(t) for t in group}) == 3 for group in tokens)  # the K samples of a prompt differ


class Scripted(torch.nn.Module):
    """The tiny model with its logits overridden so that row r emits scripts[r], then `filler` forever."""

    def __init__(self, inner, scripts: list[list[int]], filler: int):
        super().__init__()
        self.inner, self.scripts, self.filler, self.calls = inner, scripts, filler, 0

    @property
    def config(self):
        return self.inner.config

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        step, self.calls = self.calls, self.calls + 1
        for row, script in enumerate(self.scripts):
            out.logits[row, -1] = 0.0
            out.logits[row, -1, script[step] if step < len(script) else self.filler] = 100.0
        return out


def test_tool_call_stops_at_eom_and_is_parsed(tiny):
    model, tok = tiny
    call = [PYTHON_TAG, *tok.encode('brave_search.call(query="weather in Paris")', add_special_tokens=False), EOM]
    hello = [*tok.encode("Hello there.", add_special_tokens=False), EOT]
    filler = tok.encode(" a", add_special_tokens=False)[0]
    prompts = [[{"role": "user", "content": q}] for q in ("weather?", "hello?", "count!")]  # same length: stay in order
    assert len({len(_ids(p, tok)) for p in prompts}) == 1
    scripted = Scripted(model, [call, hello, []], filler)
    (tool,), (plain,), (cut,) = G.generate(scripted, tok, prompts, k=1, temperature=0.0, max_new_tokens=20,
                                           batch_size=3, progress=False)
    assert tool.stop_reason == "eom" and tool.token_ids == call and tool.num_tokens == len(call)
    assert tool.text == '<|python_tag|>brave_search.call(query="weather in Paris")'
    assert tool.message == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "brave_search", "arguments": {"query": "weather in Paris"}}}]}
    assert plain.stop_reason == "eot" and plain.message == {"role": "assistant", "content": "Hello there."}
    assert cut.stop_reason == "length" and cut.token_ids == [filler] * 20 and cut.text == " a" * 20


def test_load_policy_merges_a_lora_adapter(tiny, tiny_model_dir, tmp_path):
    from peft import PeftModel

    from posttrain.backbone import apply_lora, load_model, merge_lora
    from posttrain.config import LoRAConfig

    torch.manual_seed(1)
    peft_model = apply_lora(load_model(tiny_model_dir, dtype=torch.float32), LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # B starts at zero; make the adapter change the outputs
    peft_model.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    loaded, tokenizer = G.load_policy(tmp_path / "adapter", torch.float32)
    assert not isinstance(loaded, PeftModel) and len(tokenizer) == 128_256
    kwargs = dict(k=1, temperature=0.0, max_new_tokens=6, progress=False)
    from_path = G.generate(str(tmp_path / "adapter"), None, [MEDIUM], **kwargs)
    in_memory = G.generate(merge_lora(peft_model).eval(), tokenizer, [MEDIUM], **kwargs)
    base = G.generate(tiny[0], tokenizer, [MEDIUM], **kwargs)
    assert from_path[0][0].token_ids == in_memory[0][0].token_ids != base[0][0].token_ids


def test_system_prompt_and_options(tiny):
    assert G.with_system_prompt(SHORT, "Be brief.") == [{"role": "system", "content": "Be brief."}, *SHORT]
    assert G.with_system_prompt(LONG, "Be brief.")[0] == {"role": "system", "content": "Be brief.\n\nYou are terse."}
    assert G.with_system_prompt(SHORT, None) is SHORT
    model, tok = tiny
    assert G.stop_reasons(tok) == {128001: "eos", 128008: "eom", 128009: "eot"}
    kwargs = dict(k=1, temperature=0.0, max_new_tokens=4, progress=False)
    steered = G.generate(model, tok, [SHORT, SHORT], system_prompt=["You are terse.", None], **kwargs)
    explicit = G.generate(model, tok, [[{"role": "system", "content": "You are terse."}, *SHORT]], **kwargs)
    assert steered[0][0].token_ids == explicit[0][0].token_ids != steered[1][0].token_ids
    assert G.generate(model, tok, [SHORT], compile=True, **kwargs)[0][0].token_ids == steered[1][0].token_ids
    with pytest.raises(ValueError, match="top_p"):
        G.generate(model, tok, [SHORT], top_p=0.0, progress=False)
    with pytest.raises(ValueError, match="seed: 1 seeds for 2 prompts"):
        G.generate(model, tok, [SHORT, SHORT], seed=[3], progress=False)
