"""The sandbox's syscall filter, compiled with libseccomp (the library behind Docker's, Podman's and systemd's filters)
through ctypes: libseccomp2 ships with every Debian and Ubuntu system (apt itself depends on it).

Model-written Python never needs namespaces, mounts, kernel keyrings, BPF, ptrace or io_uring, and each is kernel
attack surface: inside bwrap a program could otherwise create a nested user namespace with a full set of
capabilities in it. The filter makes those calls fail with EPERM. clone3 fails with ENOSYS, since its flags sit
behind a pointer the filter cannot read: glibc then falls back to clone, whose namespace flags are refused. A
syscall of another architecture (the 32-bit entry points) kills the process, libseccomp's default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

DENIED = (
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount",
    "fsconfig", "fspick", "mount_setattr", "keyctl", "add_key", "request_key", "bpf", "perf_event_open",
    "userfaultfd", "ptrace", "process_vm_readv", "process_vm_writev", "io_uring_setup", "io_uring_enter",
    "io_uring_register", "open_by_handle_at", "name_to_handle_at", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "quotactl", "acct", "swapon", "swapoff", "reboot", "settimeofday",
    "clock_settime", "adjtimex", "lookup_dcookie", "vhangup",
)
# clone flags that create a namespace: CLONE_NEWTIME, NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET
NAMESPACE_FLAGS = (0x80, 0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
_ALLOW = 0x7FFF0000
_MASKED_EQ = 7  # SCMP_CMP_MASKED_EQ: (arg & datum_a) == datum_b


class _ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


def _errno_action(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)  # SCMP_ACT_ERRNO(code)


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def unavailable() -> str | None:
    """Why no filter can be compiled here (None: it can)."""
    return None if _library() is not None else "libseccomp is not installed (apt-get install -y libseccomp2)"


def write_filter(fd: int) -> None:
    """Write the compiled filter (a cBPF program, the form `bwrap --seccomp FD` reads) to the open file `fd`."""
    lib = _library()
    if lib is None:
        raise RuntimeError(unavailable())
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        raise RuntimeError("seccomp_init failed")
    try:
        def deny(name: str, action: int, *conditions: _ArgCmp) -> None:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                return  # not a syscall of this architecture
            array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
            result = lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
            if result < 0:
                raise RuntimeError(f"seccomp_rule_add({name}) failed: {os.strerror(-result)}")

        for name in DENIED:
            deny(name, _errno_action(errno.EPERM))
        deny("clone3", _errno_action(errno.ENOSYS))
        for flag in NAMESPACE_FLAGS:
            deny("clone", _errno_action(errno.EPERM), _ArgCmp(0, _MASKED_EQ, flag, flag))
        result = lib.seccomp_export_bpf(ctx, fd)
        if result < 0:
            raise RuntimeError(f"seccomp_export_bpf failed: {os.strerror(-result)}")
    finally:
        lib.seccomp_release(ctx)
