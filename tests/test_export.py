"""`posttrain export`: every format loads back with load_model and gives the source's logits (gguf: and tokens)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.integrations.gguf.reader import GgufHeader

from posttrain import gguf_format
from posttrain.backbone import apply_lora, llama3_config, load_model, save_model
from posttrain.cli import main
from posttrain.config import LoRAConfig
from posttrain.generate import load_policy
from posttrain.tokenizer import load_tokenizer

IDS = torch.tensor([[128000, 9906, 11, 1917, 0, 128009]])
SMOL_IDS = torch.tensor([[1, 19556, 28, 905, 17, 2]])
# GGML tensor type ids (gguf.GGMLQuantizationType)
F32, F16, BF16 = 0, 1, 30


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _adapter(base, path):
    """A LoRA adapter on `base` whose B matrices are non-zero, so merging it changes the logits."""
    torch.manual_seed(1)
    model = apply_lora(load_model(base, dtype=torch.float32), LoRAConfig(r=4))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tiny_model_dir):
    return _adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def smol_model_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama with SmolLM2's tokenizer and chat template, plain RoPE and tied embeddings, as SmolLM2 has
    (a 49,152-id vocab reads back from GGUF far faster than Llama 3's 128,256)."""
    tokenizer = load_tokenizer(smollm2_dir)
    config = llama3_config("tiny")
    config.vocab_size, config.tie_word_embeddings = len(tokenizer), True
    config.rope_parameters = {"rope_type": "default", "rope_theta": 100000.0}
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-smol")
    save_model(LlamaForCausalLM(config), path, format="hf", tokenizer=tokenizer)
    return path


@pytest.mark.parametrize("fmt", ["hf", "merged", "meta"])
def test_a_full_model_round_trips(tmp_path, tiny_model_dir, fmt, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tiny_model_dir), "--to", str(out), "--format", fmt]) == 0
    assert str(out) in capsys.readouterr().out
    assert (out / ("params.json" if fmt == "meta" else "config.json")).is_file()
    torch.testing.assert_close(_logits(load_model(out, dtype=torch.float32)),
                               _logits(load_model(tiny_model_dir, dtype=torch.float32)), rtol=1e-5, atol=1e-5)
    assert not [p.name for p in tmp_path.iterdir() if p.name != "out"]  # no temp dir left behind


@pytest.mark.parametrize("fmt", ["merged", "meta"])
def test_an_adapter_is_merged_into_its_base(tmp_path, tiny_model_dir, adapter_dir, fmt):
    out = tmp_path / "out"
    assert main(["export", str(adapter_dir), "--to", str(out), "--format", fmt]) == 0
    assert not (out / "adapter_config.json").exists()
    merged = _logits(load_model(out, dtype=torch.float32))
    torch.testing.assert_close(merged, _logits(load_policy(adapter_dir, torch.float32)[0]), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, _logits(load_model(tiny_model_dir, dtype=torch.float32)), atol=1e-3)


def test_hf_keeps_an_adapter_an_adapter_with_an_absolute_base(tmp_path, monkeypatch, tiny_model_dir, adapter_dir):
    source = tmp_path / "adapter"
    shutil.copytree(adapter_dir, source)
    config = json.loads((source / "adapter_config.json").read_text())
    monkeypatch.chdir(tmp_path)
    config["base_model_name_or_path"] = os.path.relpath(tiny_model_dir, tmp_path)  # a base relative to the cwd
    (source / "adapter_config.json").write_text(json.dumps(config))
    assert main(["export", "adapter", "--to", "out", "--format", "hf"]) == 0
    exported = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert exported["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tmp_path.parent)
    torch.testing.assert_close(_logits(load_policy(tmp_path / "out", torch.float32)[0]),
                               _logits(load_policy(adapter_dir, torch.float32)[0]))


@pytest.mark.parametrize("fmt", ["hf", "gguf"])
def test_a_non_empty_target_is_refused_untouched(tmp_path, tiny_model_dir, capsys, fmt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_model_dir), "--to", str(out), "--format", fmt]) == 2
    assert capsys.readouterr().err.startswith("posttrain export: error: --to: ")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("fmt", ["merged", "gguf"])
def test_a_source_that_is_no_model_is_refused(tmp_path, capsys, fmt):
    (tmp_path / "notes").mkdir()
    assert main(["export", str(tmp_path / "notes"), "--to", str(tmp_path / "out"), "--format", fmt]) == 2
    assert "not an HF dir (config.json), Meta dir (params.json), .gguf file" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes"]


def test_gguf_round_trips_a_llama3_model_and_its_tokenizer(tmp_path, tiny_model_dir, llama3_tokenizer, capsys):
    out = tmp_path / "out"
    assert main(["export", str(tiny_model_dir), "--to", str(out), "--format", "gguf"]) == 0
    assert str(out / "model.gguf") in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["model.gguf"]
    model, tokenizer = load_policy(out / "model.gguf", torch.float32)
    source = load_model(tiny_model_dir, dtype=torch.float32)
    assert model.config.rope_parameters == source.config.rope_parameters  # Llama 3.1 RoPE scaling, factor 8
    torch.testing.assert_close(_logits(model), _logits(source), rtol=1e-5, atol=1e-5)
    for text in ["Hello, world!", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 23 + 58?"
                 "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "  two spaces\n\n12345 ünïcödé 日本語"]:
        assert tokenizer(text).input_ids == llama3_tokenizer(text).input_ids
    assert tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "<|eot_id|>"]) == [128006, 128009]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        llama3_tokenizer.bos_token, llama3_tokenizer.eos_token, llama3_tokenizer.pad_token)


def test_gguf_round_trips_smollm2s_tokenizer_template_and_tied_embeddings(tmp_path, smol_model_dir):
    out = tmp_path / "out"
    assert main(["export", str(smol_model_dir), "--to", str(out), "--format", "gguf"]) == 0
    assert "output.weight" not in GgufHeader.from_file(str(out / "model.gguf")).ggml_types  # tied: one matrix
    model, tokenizer = load_policy(out / "model.gguf", torch.float32)
    source, source_tokenizer = load_policy(smol_model_dir, torch.float32)
    assert model.config.tie_word_embeddings and model.config.rope_parameters == source.config.rope_parameters
    torch.testing.assert_close(_logits(model, SMOL_IDS), _logits(source, SMOL_IDS), rtol=1e-5, atol=1e-5)
    for text in ["Hello, world!", "<|im_start|>user\nWhat is 23 + 58?<|im_end|>\n<|im_start|>assistant\n",
                 "  two spaces\n\n12345 ünïcödé"]:
        assert tokenizer(text).input_ids == source_tokenizer(text).input_ids
    messages = [{"role": "user", "content": "What is 23 + 58?"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        source_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize(("dtype", "half"), [("bfloat16", BF16), ("float16", F16)])
def test_gguf_stores_matrices_in_the_dtype_asked_and_norms_in_f32(tmp_path, smol_model_dir, dtype, half):
    out = tmp_path / "out"
    assert main(["export", str(smol_model_dir), "--to", str(out), "--format", "gguf", "--dtype", dtype]) == 0
    types = GgufHeader.from_file(str(out / "model.gguf")).ggml_types
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == half
    assert types["blk.0.attn_norm.weight"] == F32
    torch_dtype = getattr(torch, dtype)
    torch.testing.assert_close(_logits(load_model(out / "model.gguf", dtype=torch_dtype), SMOL_IDS),
                               _logits(load_model(smol_model_dir, dtype=torch_dtype), SMOL_IDS))


def test_gguf_of_an_adapter_is_the_merged_model(tmp_path, smol_model_dir):
    adapter = _adapter(smol_model_dir, tmp_path / "adapter")
    out = tmp_path / "out"
    assert main(["export", str(adapter), "--to", str(out), "--format", "gguf"]) == 0
    merged = _logits(load_model(out / "model.gguf", dtype=torch.float32), SMOL_IDS)
    torch.testing.assert_close(merged, _logits(load_policy(adapter, torch.float32)[0], SMOL_IDS), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(merged, _logits(load_model(smol_model_dir, dtype=torch.float32), SMOL_IDS), atol=1e-3)


def test_gguf_without_its_package_names_the_pip_command_and_writes_nothing(tmp_path, monkeypatch, tiny_model_dir,
                                                                          capsys):
    real = gguf_format.importlib.util.find_spec
    monkeypatch.setattr(gguf_format.importlib.util, "find_spec", lambda name: None if name == "gguf" else real(name))
    assert main(["export", str(tiny_model_dir), "--to", str(tmp_path / "out"), "--format", "gguf"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "posttrain export: error: --format gguf needs the `gguf` package: pip install gguf"
    assert not list(tmp_path.iterdir())
