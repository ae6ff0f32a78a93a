"""Run a program under the filter systemd installs for MemoryDenyWriteExecute=yes.

    python tests/deny_write_execute.py PROGRAM [ARGS...]

deploy/fennec-chat@.service sets MemoryDenyWriteExecute=yes, which breaks any code that makes
memory both writable and executable (a JIT, libffi's closures on some systems, an executable
stack). Whether the server runs so cannot be tried with systemd here (it is not PID 1 in a test
run), so this installs the same seccomp filter (systemd 252's, src/shared/seccomp-util.c) and
then becomes PROGRAM: mmap() with PROT_WRITE and PROT_EXEC, mprotect() or pkey_mprotect() with
PROT_EXEC, and shmat() with SHM_EXEC fail with EPERM. The filter stays across execve() and
fork(), so it holds for the whole server. Linux on x86-64 or arm64 only.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import struct
import sys

# linux/audit.h, and each architecture's system call numbers.
ARCHITECTURES = {
    "x86_64": (0xC000003E, {"mmap": 9, "mprotect": 10, "shmat": 30, "pkey_mprotect": 329}),
    "aarch64": (0xC00000B7, {"mmap": 222, "mprotect": 226, "shmat": 196, "pkey_mprotect": 288}),
}

# linux/filter.h and linux/seccomp.h
BPF_LD_W_ABS, BPF_JEQ_K, BPF_AND_K, BPF_RET_K = 0x20, 0x15, 0x54, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO = 0x7FFF0000, 0x00050000
EPERM = 1
SHM_EXEC = 0o100000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
# struct seccomp_data: nr (4 bytes), arch (4), instruction_pointer (8), args (6 x 8, little-endian).
NR, ARCH = 0, 4


def low_half_of_arg(index: int) -> int:
    return 16 + 8 * index


def supported() -> bool:
    return sys.platform == "linux" and platform.machine() in ARCHITECTURES


def program() -> bytes:
    """The BPF program, as struct sock_filter entries (code, jt, jf, k)."""
    arch, numbers = ARCHITECTURES[platform.machine()]
    deny, allow = (BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | EPERM), (BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW)

    def refuse_if(argument: int, mask: int) -> list[tuple[int, int, int, int]]:
        """Refuse when all of `mask`'s bits are set in the argument, else allow."""
        return [
            (BPF_LD_W_ABS, 0, 0, low_half_of_arg(argument)),
            (BPF_AND_K, 0, 0, mask),
            (BPF_JEQ_K, 0, 1, mask),
            deny,
            allow,
        ]

    checks = {
        "mmap": refuse_if(2, mmap.PROT_WRITE | mmap.PROT_EXEC),
        "mprotect": refuse_if(2, mmap.PROT_EXEC),
        "pkey_mprotect": refuse_if(2, mmap.PROT_EXEC),
        "shmat": refuse_if(2, SHM_EXEC),
    }
    # Another architecture's calls (a 32-bit one) have other numbers: allowed here, where
    # systemd refuses them outright (SystemCallArchitectures=native).
    head = [(BPF_LD_W_ABS, 0, 0, ARCH), (BPF_JEQ_K, 1, 0, arch), allow, (BPF_LD_W_ABS, 0, 0, NR)]
    # One jump per call to its check; each check is 5 instructions, after the jumps and an allow.
    body: list[tuple[int, int, int, int]] = []
    for position, name in enumerate(checks):
        skip_to_check = (len(checks) - position - 1) + 1 + 5 * position
        body.append((BPF_JEQ_K, skip_to_check, 0, numbers[name]))
    body.append(allow)
    for check in checks.values():
        body += check
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in head + body)


def install() -> None:
    """From now on, in this process and every one it starts."""
    code = program()
    buffer = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(code) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, None, 0, 0) != 0:  # NoNewPrivileges=yes, and required
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


if __name__ == "__main__":
    install()
    os.execv(sys.argv[1], sys.argv[1:])
