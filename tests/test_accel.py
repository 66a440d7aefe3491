"""posttrain.accel: segment bounds, the attention function against transformers' SDPA (packed, padded, prefill,
decode), the Liger patch wiring, lean LoRA against PEFT, the weights fingerprint, the config, and bench/run.py --dry.
GPU tests (-m gpu) check flash attention, Liger and the CUDA-graph decode against the plain path: SFT loss and grads,
DPO loss, sampled tokens."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, LlamaForCausalLM, StaticCache

from posttrain import accel, backbone
from posttrain.config import ConfigError, LoRAConfig, from_dict
from posttrain.packing import PackedCollator

REPO = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def models():
    """(plain, fast): the same tiny random Llama 3 model, SDPA and `accel.ATTENTION`, in float32 on CPU."""
    torch.manual_seed(0)
    plain = LlamaForCausalLM(backbone.llama3_config("tiny")).eval()
    fast = copy.deepcopy(plain)
    accel.use_fast_attention(fast)
    return plain, fast


def test_segment_bounds_split_at_position_restarts_and_padding_edges():
    cpu = torch.device("cpu")
    assert accel.segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]]), None, 1, 6, cpu)[0].tolist() == [0, 3, 5, 6]
    assert accel.segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0]]), None, 1, 6, cpu)[1] == 3
    # right padding with plain positions: the tail is its own segment
    cu, longest = accel.segment_bounds(torch.arange(6)[None], torch.tensor([[1, 1, 1, 1, 0, 0]]), 1, 6, cpu)
    assert (cu.tolist(), longest) == ([0, 4, 6], 4)
    # left padding as generate.prefill lays it out (pads at position 0): one segment per pad token
    cu, _ = accel.segment_bounds(torch.tensor([[0, 0, 0, 0, 1, 2]]), torch.tensor([[0, 0, 0, 1, 1, 1]]), 1, 6, cpu)
    assert cu.tolist() == [0, 1, 2, 3, 6]
    # rows are flattened: the second row starts a segment at its first token
    cu, longest = accel.segment_bounds(torch.tensor([[0, 1, 2], [0, 1, 2]]), None, 2, 3, cpu)
    assert (cu.tolist(), longest) == ([0, 3, 6], 3)


def test_packed_rows_match_sdpa_and_each_example_alone(models):
    plain, fast = models
    ids = torch.randint(1000, 5000, (2, 12))
    rows = PackedCollator(pad_token_id=0)([{"input_ids": ids[0].tolist(), "labels": ids[0].tolist(),
                                            "seq_lengths": [5, 4, 3]},
                                           {"input_ids": ids[1, :9].tolist(), "labels": ids[1, :9].tolist(),
                                            "seq_lengths": [9]}])
    with torch.no_grad():
        want = plain(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits
        got = fast(input_ids=rows["input_ids"], position_ids=rows["position_ids"], use_cache=False).logits
        alone = plain(input_ids=ids[:1, 5:9]).logits[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[0, 5:9], alone, rtol=1e-5, atol=1e-5)


def test_right_padded_rows_match_sdpa_on_real_tokens(models):
    plain, fast = models
    ids = torch.randint(1000, 5000, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, 7:] = 0
    with torch.no_grad():
        want = plain(input_ids=ids, attention_mask=mask).logits
        got = fast(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0, :7], want[0, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def _prefill_then_decode(model, ids, mask):
    """Left-padded prefill into a dynamic cache, copied into a static one, then one decode step (as generate does)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    dynamic = DynamicCache(config=model.config)
    prefill = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=dynamic, use_cache=True).logits
    static = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 4)
    for static_layer, layer in zip(static.layers, dynamic.layers):
        static_layer.update(layer.keys, layer.values)
    full_mask = torch.cat([mask, torch.zeros(len(ids), 4, dtype=torch.long)], dim=1)
    full_mask[:, ids.shape[1]] = 1
    step = model(input_ids=ids[:, :1], attention_mask=full_mask, position_ids=positions[:, -1:] + 1, cache=static,
                 use_cache=True).logits
    return prefill, step


def test_left_padded_prefill_and_grouped_decode_match_sdpa(models):
    plain, fast = models
    ids = torch.randint(1000, 5000, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        want_prefill, want_step = _prefill_then_decode(plain, ids, mask)
        got_prefill, got_step = _prefill_then_decode(fast, ids, mask)
    torch.testing.assert_close(got_prefill[0, 3:], want_prefill[0, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_prefill[1], want_prefill[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_step, want_step, rtol=1e-5, atol=1e-5)


def test_decode_attention_reads_each_kv_head_for_its_query_group():
    torch.manual_seed(1)
    query, key, value = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    got = accel._decode_attention(query, key, value, mask, 0.5)  # [B, 1, Hq, D]
    want = F.scaled_dot_product_attention(query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1),
                                          attn_mask=mask, scale=0.5)  # query heads 0, 1 read KV head 0
    torch.testing.assert_close(got, want.transpose(1, 2))


def test_liger_patch_routes_norms_and_mlps_through_the_kernels(models, monkeypatch):
    """Fake kernels that compute the reference maths: the patched model must give the same logits, and the patch must
    pass (x, weight, eps, offset 0, llama casting, not in place) and (gate, up)."""
    plain, _ = models
    calls = {"norm": 0, "swiglu": 0}

    class Norm:
        @staticmethod
        def apply(x, weight, eps, offset, casting, in_place):
            assert (offset, casting, in_place) == (0.0, "llama", False)
            calls["norm"] += 1
            h = x.float()
            return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    class SiLUMul:
        @staticmethod
        def apply(gate, up):
            calls["swiglu"] += 1
            return F.silu(gate) * up

    for name, attr, kernel in (("rms_norm", "LigerRMSNormFunction", Norm), ("swiglu", "LigerSiLUMulFunction", SiLUMul)):
        module = types.ModuleType(f"liger_kernel.ops.{name}")
        setattr(module, attr, kernel)
        monkeypatch.setitem(sys.modules, f"liger_kernel.ops.{name}", module)
    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setitem(sys.modules, "liger_kernel.ops", types.ModuleType("liger_kernel.ops"))
    patched = copy.deepcopy(plain)
    assert accel.use_liger_kernels(patched) == 2 * 2 + 1 + 2  # 2 norms per layer + the final norm, 1 MLP per layer
    ids = torch.randint(1000, 5000, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(patched(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert calls == {"norm": 5, "swiglu": 2}
    assert type(plain.model.norm).forward is plain.model.norm.forward.__func__  # other instances keep theirs


def test_lean_lora_matches_peft_forward_and_grads_and_defers_when_adapters_are_off():
    torch.manual_seed(0)
    peft_model = backbone.apply_lora(LlamaForCausalLM(backbone.llama3_config("tiny")), LoRAConfig(r=4, alpha=8))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B starts at 0, which would hide the update
    lean = copy.deepcopy(peft_model)
    assert accel.use_lean_lora(lean) == 2 * 7  # q k v o gate up down in each of the 2 layers
    ids = torch.randint(1000, 5000, (2, 9))
    want, got = peft_model(input_ids=ids, labels=ids), lean(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, want.logits)
    want.loss.backward()
    got.loss.backward()
    grads = [(a.grad, b.grad) for a, b in zip(peft_model.parameters(), lean.parameters()) if a.requires_grad]
    assert len(grads) == 2 * 2 * 7
    for want_grad, got_grad in grads:
        torch.testing.assert_close(got_grad, want_grad)
    with torch.no_grad(), peft_model.disable_adapter(), lean.disable_adapter():  # DPO's reference pass
        base = lean(input_ids=ids).logits
        torch.testing.assert_close(base, peft_model(input_ids=ids).logits)
    assert not torch.allclose(base, got.logits)


def test_weights_fingerprint_follows_every_weight_and_replaces_trls_hash_only_inside():
    import trl.trainer.dpo_trainer as trl_dpo

    torch.manual_seed(0)
    model = LlamaForCausalLM(backbone.llama3_config("tiny"))
    before = accel.weights_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] += 1e-3
    assert accel.weights_fingerprint(model) != before
    real = trl_dpo.hash_module
    with accel.device_fingerprint():
        assert trl_dpo.hash_module is accel.weights_fingerprint
    assert trl_dpo.hash_module is real


def test_config_validates_and_apply_changes_nothing_without_cuda(models, monkeypatch):
    with pytest.raises(ConfigError, match="attn"):
        accel.AccelConfig(attn="flash")
    with pytest.raises(ConfigError, match="checkpoint_every"):
        accel.AccelConfig(checkpoint_every=0)
    assert from_dict(accel.AccelConfig, {"liger": False}).liger is False
    assert accel.checkpointing_kwargs(accel.AccelConfig(checkpoint_every=2)) == {"use_reentrant": False,
                                                                                 "every_n_layers": 2}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plain, _ = models
    assert accel.apply(plain, accel.AccelConfig()) == []
    assert plain.config._attn_implementation == "sdpa"


@pytest.mark.slow
def test_bench_dry_run_writes_json_results_and_a_ratio_table(tmp_path):
    """Stock and ours of every workload at tiny sizes (the loss check runs the same stage code twice: left out)."""
    results = tmp_path / "RESULTS.md"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--dry", "--workloads", "sft,dpo,gen,rm",
                          "--out", str(tmp_path), "--results", str(results), "--profile", str(tmp_path / "prof")],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["card"] == "cpu" and data["dry"] is True
    for workload in ("sft", "dpo", "gen", "rm"):
        assert list(data["workloads"][workload]) == ["stock", "ours"]
        for name, figures in data["workloads"][workload].items():
            assert "error" not in figures, (workload, name, figures)
    assert data["workloads"]["sft"]["ours"]["tokens_per_step"] > 0
    for workload in ("sft", "dpo", "gen", "rm"):  # profiled on the CPU: host ops only, no device figures
        profile = data["workloads"][workload]["ours"]["profile"]
        assert profile["gpu_busy_pct"] is None and profile["steps"] >= 1, (workload, profile)
        assert "host ops, by total time" in (tmp_path / "prof" / f"{workload}-ours.txt").read_text()
    assert "profile" in data["workloads"]["sft"]["stock"]
    table = run.stdout.strip().splitlines()
    assert table[-1].split()[:2] == ["rm", "ours"]  # the ratio table comes last
    assert "| sft | ours |" in results.read_text()


def test_bench_sampling_prompts_render_to_the_length_of_stocks_prompts():
    """Stock samples from `prompt_tokens` ids; ours renders chat prompts: the same length, so the same KV cache."""
    from bench.workloads import Sizes, gen_prompts, load_tokenizer
    from posttrain import chat

    tok = load_tokenizer()
    prompts = gen_prompts(Sizes(prompt_tokens=48), 6)
    assert [len(chat.render(p, tok, add_generation_prompt=True).ids) for p in prompts] == [48] * 6
    assert len({p[0]["content"] for p in prompts}) == 6


def test_profile_summary_counts_busy_time_host_waits_and_top_kernels():
    from bench.traces import summarize

    def event(cat, name, ts, dur):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}

    trace = {"traceEvents": [
        event("kernel", "gemm", 0, 300_000), event("kernel", "gemm", 200_000, 200_000),  # overlap: 400 ms busy
        event("gpu_memcpy", "Memcpy DtoH", 500_000, 100_000),
        event("kernel", "ncclDevKernel_AllReduce", 700_000, 50_000),
        event("cuda_runtime", "cudaStreamSynchronize", 450_000, 40_000),
        event("cuda_runtime", "cudaStreamSynchronize", 650_000, 10_000),
        event("cuda_runtime", "cudaLaunchKernel", 0, 5),
        event("cpu_op", "aten::mm", 0, 1_000), {"ph": "i", "cat": "kernel", "name": "instant", "ts": 0},
    ]}
    figures, text = summarize(trace, wall_s=1.0, steps=2)
    assert figures["gpu_busy_pct"] == 55.0  # 400 + 100 + 50 ms of 1 s
    assert figures["host_syncs_per_step"] == 1.0 and figures["host_wait_ms_per_step"] == 25.0
    assert figures["nccl_ms_per_step"] == 25.0 and figures["kernels_per_step"] == 2  # 3 kernels / 2 steps, rounded
    first_kernel = text.split("device kernels")[1].splitlines()[1].split()
    assert first_kernel[0] == "250.00" and first_kernel[-1] == "gemm"  # 500 ms of gemm over 2 steps
    assert "2  cudaStreamSynchronize" in text


# ---------------------------------------------------------------------------------------------------- GPU


def _tiny_cuda(dtype=torch.bfloat16):
    torch.manual_seed(0)
    config = backbone.llama3_config("tiny")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 256, 512
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 64
    with torch.device("cuda"):
        return LlamaForCausalLM(config).to(dtype)


def _sft_loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


@pytest.mark.gpu
@cuda
def test_gpu_flash_varlen_and_liger_give_the_sft_loss_and_grads_of_sdpa():
    plain = _tiny_cuda()
    fast = copy.deepcopy(plain)
    accel.use_fast_attention(fast)
    accel.use_liger_kernels(fast)
    lengths = [[700, 900, 448], [2048]]
    rows = [{"input_ids": torch.randint(1000, 9000, (sum(s),)).tolist(), "seq_lengths": s} for s in lengths]
    batch = PackedCollator(0)([{**r, "labels": r["input_ids"]} for r in rows])
    batch = {k: v.cuda() for k, v in batch.items()}
    want_loss, want_grads = _sft_loss_and_grads(plain, batch)
    got_loss, got_grads = _sft_loss_and_grads(fast, batch)
    assert abs(got_loss.item() - want_loss.item()) < 1e-2 * want_loss.item()
    assert (got_grads - want_grads).norm() < 3e-2 * want_grads.norm()


@pytest.mark.gpu
@cuda
def test_gpu_dpo_loss_with_levers_matches_plain():
    from posttrain.dpo import PairCollator
    from posttrain.losses import dpo_loss, sequence_logps

    plain = _tiny_cuda()
    fast = copy.deepcopy(plain)
    accel.use_fast_attention(fast)
    accel.use_liger_kernels(fast)
    pairs = [{"prompt_ids": torch.randint(1000, 9000, (n,)).tolist(),
              "chosen_ids": torch.randint(1000, 9000, (m,)).tolist(), "chosen_mask": [True] * m,
              "rejected_ids": torch.randint(1000, 9000, (m + 7,)).tolist(), "rejected_mask": [True] * (m + 7)}
             for n, m in ((40, 90), (128, 33))]
    batch = {k: v.cuda() for k, v in PairCollator(0)(pairs).items()}

    def loss(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        token_logps = logits[:, :-1].float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        logps, _ = sequence_logps(token_logps, batch["completion_mask"])
        chosen, rejected = logps.chunk(2)
        return dpo_loss(chosen, rejected, chosen.detach() - 0.5, rejected.detach() + 0.5, beta=0.1)[0]

    with torch.no_grad():
        assert abs(loss(fast).item() - loss(plain).item()) < 1e-2


@pytest.mark.gpu
@cuda
def test_gpu_cuda_graph_sampling_gives_the_tokens_of_the_plain_loop(llama3_tokenizer):
    from posttrain.generate import generate

    plain = _tiny_cuda(torch.float32).eval()
    prompts = [[{"role": "user", "content": "Name three colours."}], [{"role": "user", "content": "2 + 2?"}]]
    kw = dict(k=4, max_new_tokens=24, seed=7, progress=False, temperature=1.0, top_p=0.9)
    want = generate(plain, llama3_tokenizer, prompts, **kw)
    got = generate(copy.deepcopy(plain), llama3_tokenizer, prompts, cuda_graph=True, **kw)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
