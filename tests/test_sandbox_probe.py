"""Whether the sandbox can run here: a slow bwrap start is not a missing bwrap, and without isolation a sandbox test
is skipped, except in CI (`CI=true`), where it fails and names what to install."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from synth import sandbox

REPO = Path(__file__).resolve().parents[1]


def test_a_slow_bwrap_start_is_not_read_as_unavailable(monkeypatch):
    calls = []

    def slow_start(argv, **kwargs):
        """bwrap that starts later than any time limit set on it, then prints ok."""
        calls.append(argv)
        if kwargs.get("timeout") is not None:
            raise subprocess.TimeoutExpired(argv, kwargs["timeout"])
        return subprocess.CompletedProcess(argv, 0, b"ok\n", b"")

    @contextmanager
    def no_filter(staging):
        yield 0

    monkeypatch.setattr(sandbox.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sandbox.seccomp, "unavailable", lambda: None)
    monkeypatch.setattr(sandbox, "_seccomp_filter", no_filter)
    monkeypatch.setattr(sandbox.subprocess, "run", slow_start)
    assert sandbox._bwrap_failure.__wrapped__(sys.executable, sys.prefix) is None
    assert calls and calls[0][0] == "bwrap"


def _pytest_without_bwrap(tmp_path: Path, ci: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": str(tmp_path), "CI": ci}  # no bwrap on PATH
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfs", "-p", "no:cacheprovider",
                           "tests/test_sandbox_seccomp.py"], cwd=REPO, env=env, capture_output=True, text=True)


def test_without_bwrap_sandbox_tests_fail_in_ci_and_skip_elsewhere(tmp_path):
    ci = _pytest_without_bwrap(tmp_path, "true")
    assert ci.returncode == 1, ci.stdout + ci.stderr
    assert "skipped" not in ci.stdout and "failed" in ci.stdout
    assert "CI=true, so this sandbox test must run: no OS isolation for the sandbox here (bwrap is not installed): " \
           "install bubblewrap and libseccomp (apt-get install -y bubblewrap libseccomp2)" in ci.stdout
    here = _pytest_without_bwrap(tmp_path, "")
    assert here.returncode == 0, here.stdout + here.stderr
    assert "skipped" in here.stdout and "failed" not in here.stdout
    assert "bwrap is not installed" in here.stdout
