"""Run model-written Python in a subprocess sandbox.

Isolation comes from the OS, not from inspecting the code: bubblewrap (`bwrap`) puts the program in new network,
pid, ipc and uts namespaces, under a seccomp filter (synth/seccomp.py: no nested namespaces, mounts, ptrace, BPF or
io_uring), with a filesystem view of only the system directories and the Python installation (read-only) plus
size-capped tmpfs mounts for its working directory, /tmp and /dev/shm. Inside, a bootstrap sets rlimits (address
space, CPU seconds, file size, process count) and, when we run as root, switches to a fresh unprivileged uid (the
kernel never applies RLIMIT_NPROC to root, so a fork bomb needs a uid of its own). The pid namespace ends with the
program: nothing it starts outlives the call. The wall clock is enforced from outside by killing bwrap, whose
namespace init dies with it (--die-with-parent).

Without bwrap or libseccomp (or where bwrap cannot create namespaces) `run_python` refuses unless
`allow_unisolated=True`; then the same rlimits apply to a plain subprocess in its own session, which is killed at
the end, but the network and the filesystem are open, no syscall filter applies, it keeps our uid (as root
RLIMIT_NPROC does nothing) and a process that calls setsid() escapes the cleanup.
"""

from __future__ import annotations

import functools
import json
import math
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from synth import seccomp

SANDBOX_IN = "/sandbox/in"  # read-only: main.py and the input files
SANDBOX_WORK = "/sandbox/work"  # the program's cwd and HOME, a private tmpfs
SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # symlinks into /usr on merged-usr systems
SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime")
PATH = "/usr/local/bin:/usr/bin:/bin"

# Runs first inside the sandbox: copy the input files in, drop root, set limits, exec the program.
# Copying happens before RLIMIT_FSIZE so inputs are not cut; NPROC is set after the uid switch so it counts
# only the sandbox's processes.
_BOOTSTRAP = r"""
import json, os, resource, shutil, sys
cfg = json.loads(sys.argv[1])
work = cfg["workdir"]
if os.path.isdir(cfg["files_dir"]):
    shutil.copytree(cfg["files_dir"], work, dirs_exist_ok=True)
uid = cfg["uid"]
if uid is not None:
    for root, dirs, files in os.walk(work):
        for name in [root] + [os.path.join(root, n) for n in dirs + files]:
            os.lchown(name, uid, uid)
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
for name, (soft, hard) in cfg["rlimits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
os.chdir(work)
os.execv(cfg["python"], [cfg["python"], "-s", cfg["script"]])
"""


class SandboxUnavailable(RuntimeError):
    """No OS isolation works here and the caller did not allow running without it."""


@dataclass
class SandboxResult:
    stdout: str
    stderr: str
    returncode: int  # negative: killed by that signal (bwrap's 128+N is mapped back)
    timed_out: bool  # the wall clock ran out and we killed the sandbox
    killed_reason: str | None  # "timeout" | "cpu_time" | "memory" | "file_size" | None
    duration_s: float
    isolation: str  # "bwrap" or "none"
    output_truncated: bool = False  # stdout or stderr was longer than max_output_bytes
    passed: bool | None = None  # run_tests only: every test ran and passed


def _python_install(python: str | None) -> tuple[str, str]:
    """(interpreter path, installation prefix to mount) for `python`, default: this interpreter's base install.

    The venv's own python would drag its site-packages and the project tree into the sandbox; the base
    interpreter needs only its prefix.
    """
    if python is None:
        executable = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
        prefix = os.path.realpath(sys.base_prefix)
    else:
        executable = os.path.realpath(python)
        prefix = str(Path(executable).parent.parent)
    if not os.access(executable, os.X_OK):
        raise ValueError(f"python: {python or executable!r} is not an executable interpreter")
    return executable, prefix


def _bwrap_argv(prefix: str, staging: str, disk_bytes: int, as_root: bool, seccomp_fd: int) -> list[str]:
    argv = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--seccomp", str(seccomp_fd)]
    if as_root:
        # The bootstrap needs these to hand the workdir to the sandbox uid and switch to it; the switch
        # clears them (all uids become non-zero) before the program starts.
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_CHOWN"]
    else:
        argv += ["--unshare-user"]  # also gives RLIMIT_NPROC a fresh count for this namespace
    argv += ["--ro-bind", "/usr", "/usr"]
    # bwrap creates missing parents of a mount point as 0700 root; the sandbox uid must traverse them.
    parents = {str(p) for path in (*SYSTEM_FILES, prefix, SANDBOX_IN) for p in Path(path).parents
               if str(p) != "/" and not (str(p) + "/").startswith("/usr/")}
    for parent in sorted(parents, key=len):
        argv += ["--perms", "0755", "--dir", parent]
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            argv += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            argv += ["--ro-bind", path, path]
    for path in SYSTEM_FILES:
        argv += ["--ro-bind-try", path, path]
    if not (prefix + "/").startswith("/usr/"):
        argv += ["--ro-bind", prefix, prefix]
    size = str(disk_bytes)
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--perms", "1777", "--size", size, "--tmpfs", "/tmp",
             "--perms", "1777", "--size", size, "--tmpfs", "/dev/shm",
             "--ro-bind", staging, SANDBOX_IN,
             "--perms", "0755", "--size", size, "--tmpfs", SANDBOX_WORK,
             "--remount-ro", "/", "--remount-ro", "/dev", "--chdir", SANDBOX_WORK, "--clearenv"]
    for key, value in _minimal_env(SANDBOX_WORK, prefix).items():
        argv += ["--setenv", key, value]
    return argv + ["--"]


def _minimal_env(home: str, prefix: str) -> dict[str, str]:
    return {"PATH": f"{prefix}/bin:{PATH}", "HOME": home, "LANG": "C.UTF-8", "TMPDIR": "/tmp"}


@contextmanager
def _seccomp_filter(staging: Path):
    """An fd open on the compiled syscall filter, for `bwrap --seccomp FD` (which reads it to the end)."""
    path = staging / "seccomp.bpf"
    with open(path, "wb") as f:
        seccomp.write_filter(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        yield fd
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=None)
def _bwrap_failure(python: str, prefix: str) -> str | None:
    """Why bwrap cannot start `python` under the syscall filter here (None: it can); probed once per interpreter.

    The probe has no time limit: on a loaded machine a start can take any time, and a slow start is not a missing
    bwrap (what this answers is cached for the whole process).
    """
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    if seccomp.unavailable():
        return seccomp.unavailable()
    with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as staging, _seccomp_filter(Path(staging)) as fd:
        argv = _bwrap_argv(prefix, staging, 1 << 20, os.geteuid() == 0, fd) + [python, "-c", "print('ok')"]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env={"PATH": PATH},
                                  pass_fds=(fd,))
        except OSError as e:
            return f"bwrap did not run: {e}"
    if done.returncode == 0 and done.stdout.strip() == b"ok":
        return None
    return f"bwrap failed (exit {done.returncode}): {done.stderr.decode(errors='replace').strip()[-300:]}"


def isolation_failure(python: str | None = None) -> str | None:
    """Why no OS isolation works here for `python` (default: this interpreter's base install); None where bwrap does."""
    return _bwrap_failure(*_python_install(python))


def isolation_available(python: str | None = None) -> str | None:
    """The isolation `run_python` would use ("bwrap"), or None where no OS isolation works."""
    return None if isolation_failure(python) else "bwrap"


def _write_inputs(staging: Path, code: str, files: dict | None, stdin: str | bytes | None) -> None:
    (staging / "in" / "files").mkdir(parents=True)
    (staging / "work").mkdir()
    (staging / "in" / "main.py").write_text(code)
    for name, content in (files or {}).items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts:
            raise ValueError(f"files: {name!r} must be a relative path inside the working directory")
        target = staging / "in" / "files" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, os.PathLike):
            _copy_host_file(Path(content), target, name)
        else:
            target.write_bytes(content.encode() if isinstance(content, str) else content)
    data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
    (staging / "stdin").write_bytes(data)
    for path in [staging / "in", *(staging / "in").rglob("*")]:  # the sandbox uid reads main.py
        path.chmod(0o755 if path.is_dir() else 0o644)


def _copy_host_file(source: Path, target: Path, name: str) -> None:
    """Copy the regular file `source` into the staging dir without following a symlink: a link (say, shipped in a
    task's data) would otherwise hand the program whatever host file it points at."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # NONBLOCK: a FIFO must not hang us
    except OSError as e:
        if os.path.islink(source):
            raise ValueError(f"files: {name!r}: {source} is a symlink; pass the file it points to") from None
        raise ValueError(f"files: {name!r}: {source}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"files: {name!r}: {source} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        with open(target, "wb") as out:
            shutil.copyfileobj(f, out)


def _read_capped(path: Path, max_bytes: int) -> tuple[str, bool]:
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return data[:max_bytes].decode("utf-8", errors="replace"), len(data) > max_bytes


def _killed_reason(returncode: int, timed_out: bool, stderr: str) -> str | None:
    if timed_out:
        return "timeout"
    if returncode == -signal.SIGXCPU:
        return "cpu_time"
    if returncode != 0 and "MemoryError" in stderr[-2000:]:
        return "memory"
    if returncode != 0 and "File too large" in stderr[-2000:]:
        return "file_size"
    return None


def run_python(code: str, *, timeout_s: float = 10, memory_mb: int = 512, cpu_s: float | None = None,
               max_output_bytes: int = 65536, files: dict[str, str | bytes | os.PathLike] | None = None,
               stdin: str | bytes | None = None, allow_unisolated: bool = False, python: str | None = None,
               disk_mb: int = 64, max_processes: int = 32) -> SandboxResult:
    """Run `code` as a script in the sandbox and return its (capped) output.

    files: name -> content (str/bytes) or a host `Path` to copy (a regular file: a symlink, FIFO or dir is refused
    with ValueError); they appear in the working directory (which is the cwd, not on sys.path). cpu_s: CPU seconds
    per process (default: timeout_s). disk_mb: size of each writable tmpfs (working dir, /tmp, /dev/shm) and of the
    largest file. max_processes: processes and threads at once.
    python: the interpreter (default: this one's base install; a venv's python resolves to its base, without the
    venv's packages).
    """
    executable, prefix = _python_install(python)
    failure = _bwrap_failure(executable, prefix)
    isolation = "none" if failure else "bwrap"
    if failure and not allow_unisolated:
        raise SandboxUnavailable(
            f"no OS isolation for model-written code ({failure}). Install bubblewrap >= 0.7 (apt-get install -y "
            "bubblewrap) and allow user namespaces (Ubuntu >= 23.10 as non-root: sysctl "
            "kernel.apparmor_restrict_unprivileged_userns=0), or pass allow_unisolated=True to run it unisolated")
    as_root = os.geteuid() == 0
    cpu_limit_s = math.ceil(cpu_s if cpu_s is not None else timeout_s)
    disk_bytes = disk_mb << 20
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
        staging = Path(tmp)
        _write_inputs(staging, code, files, stdin)
        inside_in = SANDBOX_IN if isolation == "bwrap" else str(staging / "in")
        config = {
            "workdir": SANDBOX_WORK if isolation == "bwrap" else str(staging / "work"),
            "files_dir": f"{inside_in}/files",
            "script": f"{inside_in}/main.py",
            "python": executable,
            # a uid nobody else uses; unisolated keeps ours (a root-only interpreter could not start otherwise)
            "uid": 2**20 + secrets.randbelow(2**30) if as_root and isolation == "bwrap" else None,
            "rlimits": {
                "RLIMIT_AS": [memory_mb << 20] * 2,
                "RLIMIT_CPU": [cpu_limit_s, cpu_limit_s + 1],
                "RLIMIT_FSIZE": [disk_bytes] * 2,
                "RLIMIT_NPROC": [max_processes] * 2,
                "RLIMIT_NOFILE": [256, 256],
                "RLIMIT_CORE": [0, 0],
            },
        }
        argv = [executable, "-s", "-E", "-c", _BOOTSTRAP, json.dumps(config)]
        env = _minimal_env(config["workdir"], prefix)
        started = time.monotonic()
        if isolation == "bwrap":
            with _seccomp_filter(staging) as fd:
                argv = _bwrap_argv(prefix, str(staging / "in"), disk_bytes, as_root, fd) + argv
                returncode, timed_out = _execute(argv, staging, env, timeout_s, pass_fds=(fd,))
        else:
            returncode, timed_out = _execute(argv, staging, env, timeout_s)
        duration_s = time.monotonic() - started
        if isolation == "bwrap" and returncode > 128:
            returncode = -(returncode - 128)  # bwrap's init reports a signal death as 128 + signal
        stdout, cut_out = _read_capped(staging / "stdout", max_output_bytes)
        stderr, cut_err = _read_capped(staging / "stderr", max_output_bytes)
    return SandboxResult(stdout=stdout, stderr=stderr, returncode=returncode, timed_out=timed_out,
                         killed_reason=_killed_reason(returncode, timed_out, stderr), duration_s=duration_s,
                         isolation=isolation, output_truncated=cut_out or cut_err)


def _execute(argv: list[str], staging: Path, env: dict[str, str], timeout_s: float,
             pass_fds: tuple[int, ...] = ()) -> tuple[int, bool]:
    """Run argv in its own session with output to files; kill the whole group on timeout and at the end."""
    with open(staging / "stdin", "rb") as stdin, open(staging / "stdout", "wb") as stdout, \
            open(staging / "stderr", "wb") as stderr:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=env,
                                cwd=staging / "work", start_new_session=True, close_fds=True, pass_fds=pass_fds)
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            # With bwrap this kills bwrap itself and the namespace follows; unisolated, it reaps what
            # the program left in its process group.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    return proc.returncode, timed_out


_TEST_HARNESS = """\
import os, sys
sys.path.insert(0, os.getcwd())  # so tests may `from solution import ...`
namespace = {"__name__": "solution"}
exec(compile(open("solution.py").read(), "solution.py", "exec"), namespace)
defined = set(namespace)
exec(compile(open("test_solution.py").read(), "test_solution.py", "exec"), namespace)
for name, value in list(namespace.items()):
    if name.startswith("test_") and name not in defined and callable(value):
        value()
print(%r)
"""


def run_tests(solution_code: str, test_code: str, **sandbox_kw) -> SandboxResult:
    """Run the solution, then the tests (asserts, and any test_* functions they define) in one sandboxed process.

    `passed` is True only when the process exits 0 *and* printed the end-of-tests marker, so a solution that
    calls sys.exit(0) or os._exit(0) before the tests finish does not pass.
    """
    marker = f"__tests_passed_{secrets.token_hex(8)}__"
    files = dict(sandbox_kw.pop("files", None) or {})
    files.update({"solution.py": solution_code, "test_solution.py": test_code})
    result = run_python(_TEST_HARNESS % marker, files=files, **sandbox_kw)
    lines = result.stdout.splitlines()
    result.passed = result.returncode == 0 and not result.timed_out and marker in lines
    result.stdout = "\n".join(line for line in lines if line != marker)
    return result
