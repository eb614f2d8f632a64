"""The shipped systemd files: the real `systemd-analyze` on the unit as shipped, and the facts
that must agree between the unit, sysusers.d and tmpfiles.d.

systemd-analyze comes with Debian's `systemd` package. Tests that need it skip without it,
except under CI=true, where they fail.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sysconfig
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from tests.conftest import IN_CI, REPO

SYSTEMD_DIR = REPO / "systemd"
UNIT = SYSTEMD_DIR / "dcmdb.service"
SYSUSERS = SYSTEMD_DIR / "dcmdb.sysusers"
TMPFILES = SYSTEMD_DIR / "dcmdb.tmpfiles"

# `systemd-analyze security` rates 0 (locked down) to 10 (unprotected); "OK" ends at 2.0.
MAX_EXPOSURE = 2.0

# System calls made by the daemon, its header readers and conversion workers, and dcm2niix:
# `strace -f` over the ingest, DICOMDIR, conversion (both engines), retention, daemon, CLI and
# sd_notify tests (x86_64). Among them: prlimit64 is setrlimit(RLIMIT_AS) in the conversion
# workers (glibc's setrlimit() makes that call, not the setrlimit system call of @resources);
# pidfd_open, setsid and kill run and end the workers; sendto and sendmsg carry sd_notify and the
# fork server's file descriptors.
_OBSERVED_SYSCALLS = """
accept4 access arch_prctl bind brk chdir chmod clock_gettime clock_nanosleep clone clone3
close close_range connect dup2 epoll_create1 epoll_ctl epoll_wait execve exit exit_group
fchown fcntl fdatasync flock fstat fsync ftruncate futex getcwd getdents64 getegid geteuid
getgid getpid getppid getrandom getrusage getsockname getsockopt gettid getuid
inotify_add_watch inotify_init inotify_rm_watch ioctl kill link listen listxattr lseek madvise
mbind mkdir mmap mprotect mremap munmap newfstatat openat pidfd_open pipe2 poll pread64
prlimit64 pselect6 pwrite64 read readlink recvfrom recvmsg rename restart_syscall rmdir rseq
rt_sigaction rt_sigprocmask rt_sigreturn sched_getaffinity sendfile sendmsg sendto
set_robust_list set_tid_address setitimer setsid sigaltstack socket socketpair stat statfs
symlink sysinfo uname unlink unlinkat utimensat vfork wait4 write
"""
OBSERVED_SYSCALLS = frozenset(_OBSERVED_SYSCALLS.split())
# Two of them the unit refuses on purpose, harmlessly thanks to SystemCallErrorNumber=EPERM:
#   fchown: SQLite gives its -wal, -shm and -journal files the database's owner, as root only
#   mbind: OpenBLAS's NUMA hint for its buffers when numpy is imported; it ignores the error
REFUSED_HARMLESSLY = frozenset({"fchown", "mbind"})


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        message = "systemd-analyze is not installed (Debian package: systemd)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _settings(path: Path) -> dict[str, list[str]]:
    """Every value of each "Section.Key", in order (systemd.syntax(7): a key may be repeated,
    a line ending in a backslash goes on, # and ; start comments)."""
    settings: dict[str, list[str]] = {}
    section = ""
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return settings


def _words(settings: dict[str, list[str]], key: str) -> list[str]:
    return [word for value in settings.get(key, []) for word in value.split()]


def _one(settings: dict[str, list[str]], key: str) -> str:
    values = settings.get(key, [])
    assert len(values) == 1, f"{key} is set {len(values)} times in {UNIT.name}: {values}"
    return values[0]


def _tmpfiles_lines() -> list[list[str]]:
    lines = []
    for raw in TMPFILES.read_text(encoding="utf-8").splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.split())
    return lines


def _data_folders() -> list[PurePosixPath]:
    """The folders tmpfiles.d creates: dcmdb's data folders of the default layout."""
    return [PurePosixPath(fields[1]) for fields in _tmpfiles_lines()]


def _state_folder(unit: dict[str, list[str]]) -> PurePosixPath:
    return PurePosixPath("/var/lib") / _one(unit, "Service.StateDirectory")


def _verify_root(tmp_path: Path, unit: dict[str, list[str]]) -> Path:
    """A file-system root for `systemd-analyze verify --root`: the targets every service
    depends on, and an executable at the path of each command the unit runs (verify checks
    that they exist). verify reads unit files inside the root only: `_verify` copies the unit
    there, byte for byte, where an admin installs it."""
    root = tmp_path / "root"
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True)
    for target in ("sysinit", "basic", "shutdown", "multi-user", "network-online"):
        (units / f"{target}.target").write_text(f"[Unit]\nDescription={target} (stub)\n")
    commands = [
        value for key, values in unit.items() if key.startswith("Service.Exec") for value in values
    ]
    for command in commands:
        program = root / command.split()[0].lstrip("-@:+!|").lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\nexit 0\n")
        program.chmod(0o755)
    return root


def _verify(systemd_analyze: str, root: Path, unit_text: bytes) -> subprocess.CompletedProcess[str]:
    installed = root / "etc/systemd/system/dcmdb.service"
    installed.parent.mkdir(parents=True, exist_ok=True)
    installed.write_bytes(unit_text)
    return subprocess.run(
        [systemd_analyze, "verify", "--man=no", "--generators=no", f"--root={root}", installed],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_shipped_unit_verifies_without_a_single_message(tmp_path: Path) -> None:
    systemd_analyze = _systemd_analyze()
    result = _verify(systemd_analyze, _verify_root(tmp_path, _settings(UNIT)), UNIT.read_bytes())
    output = (result.stdout + result.stderr).strip()
    assert output == "", output
    assert result.returncode == 0, output


def test_verify_as_run_here_reports_a_broken_unit(tmp_path: Path) -> None:
    """The control for the test above: the same verify, on the same root, does complain about
    a unit with a misspelt setting and a bad value (so its silence means something)."""
    systemd_analyze = _systemd_analyze()
    unit = _settings(UNIT)
    text = UNIT.read_text(encoding="utf-8").replace("ProtectSystem=strict", "ProtectSystem=stirct")
    broken = text.replace("[Service]\n", "[Service]\nProtectSytem=strict\n", 1)
    result = _verify(systemd_analyze, _verify_root(tmp_path, unit), broken.encode())
    output = result.stdout + result.stderr
    assert "ProtectSytem" in output, output
    assert "stirct" in output, output


def test_shipped_unit_exposure_is_at_most_2_0() -> None:
    systemd_analyze = _systemd_analyze()
    result = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--no-pager", UNIT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    found = re.search(r"Overall exposure level for dcmdb\.service: (\d+(?:\.\d+)?)", output)
    assert result.returncode == 0, output
    assert found, output
    exposed = "\n".join(line for line in output.splitlines() if line.startswith("✗"))
    print(f"exposure {found.group(1)}; what is left open:\n{exposed}")
    assert float(found.group(1)) <= MAX_EXPOSURE, output


def _syscall_group(systemd_analyze: str, name: str, seen: set[str] | None = None) -> set[str]:
    """The system calls in a name or @group, groups expanded, as this systemd defines them."""
    if not name.startswith("@"):
        return {name}
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    result = subprocess.run(
        [systemd_analyze, "syscall-filter", "--no-pager", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    calls: set[str] = set()
    for line in result.stdout.splitlines()[1:]:
        entry = line.strip()
        if entry and not entry.startswith("#"):
            calls |= _syscall_group(systemd_analyze, entry, seen)
    return calls


def test_the_syscall_filter_allows_every_call_the_daemon_makes() -> None:
    """SystemCallFilter= lines apply in order (systemd.exec(5)): the first, without "~", makes
    an allow list; "~" lines take calls away again, later plain lines add them back."""
    systemd_analyze = _systemd_analyze()
    unit = _settings(UNIT)
    allowed: set[str] = set()
    for value in unit["Service.SystemCallFilter"]:
        deny = value.startswith("~")
        for name in value.removeprefix("~").split():
            calls = _syscall_group(systemd_analyze, name)
            allowed = allowed - calls if deny else allowed | calls
    refused = sorted(OBSERVED_SYSCALLS - REFUSED_HARMLESSLY - allowed)
    assert refused == [], f"SystemCallFilter= refuses system calls dcmdb makes: {refused}"
    # A refused call must fail, not kill: numpy's import calls mbind().
    assert _one(unit, "Service.SystemCallErrorNumber") == "EPERM"
    # ... and the filter still refuses what it is there for.
    for call in ("setuid", "chown", "mount", "setpriority", "sched_setaffinity", "setrlimit"):
        assert call not in allowed, f"SystemCallFilter= allows {call}"


def test_requires_mounts_for_names_exactly_the_data_folders() -> None:
    unit = _settings(UNIT)
    required = sorted(PurePosixPath(path) for path in _words(unit, "Unit.RequiresMountsFor"))
    assert required == sorted(_data_folders())


def test_read_write_paths_cover_the_data_folders_and_nothing_else() -> None:
    unit = _settings(UNIT)
    writable = [PurePosixPath(path) for path in _words(unit, "Service.ReadWritePaths")]
    folders = _data_folders()
    for folder in folders:
        assert any(folder.is_relative_to(path) for path in writable), f"{folder} is read-only"
    for path in writable:
        assert any(folder.is_relative_to(path) for folder in folders), f"{path} holds no data"
    # Each ReadWritePaths= entry becomes a mount point of its own, and link() and rename()
    # fail with EXDEV between mount points even on one file system: incoming/, archive/ and
    # quarantine/ must be one entry, or every move turns into a copy.
    volume = [folder for folder in folders if folder != _state_folder(unit)]
    entries = {path for path in writable for folder in volume if folder.is_relative_to(path)}
    assert len(entries) == 1, f"{volume} are under different ReadWritePaths= entries {entries}"


def test_the_state_folder_is_the_users_home_and_its_state_directory() -> None:
    unit = _settings(UNIT)
    state = _state_folder(unit)
    (user_line,) = [line for line in _sysusers_lines() if line[0] == "u"]
    assert PurePosixPath(user_line[-1]) == state
    assert state in _data_folders()
    assert any(state.is_relative_to(path) for path in _words(unit, "Service.ReadWritePaths"))


def test_one_user_and_group_everywhere() -> None:
    unit = _settings(UNIT)
    (user_line,) = [line for line in _sysusers_lines() if line[0] == "u"]
    user = user_line[1]
    assert _one(unit, "Service.User") == user
    assert _one(unit, "Service.Group") == user  # sysusers.d "u" makes a group of the same name
    for fields in _tmpfiles_lines():
        assert fields[3:5] == [user, user], f"tmpfiles.d line {fields} is not {user}:{user}"


def test_the_unit_runs_the_daemon_on_the_production_config() -> None:
    unit = _settings(UNIT)
    command = _one(unit, "Service.ExecStart").split()
    assert command[1:] == ["--config", "/etc/dcmdb/config.toml", "run"]
    assert _one(unit, "Service.Type") == "notify"
    assert _one(unit, "Service.RestartPreventExitStatus") == "78"  # EX_CONFIG


def _sysusers_lines() -> list[list[str]]:
    """sysusers.d lines as fields; the quoted description stays one field."""
    lines = []
    for raw in SYSUSERS.read_text(encoding="utf-8").splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append([a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', raw)])
    return lines


# MemoryDenyWriteExecute=yes refuses memory that is writable and executable, and (as a seccomp
# filter on systemd < 256) any mprotect() that adds PROT_EXEC. The dynamic loader needs exactly
# that for a library with an executable stack (a missing or executable PT_GNU_STACK) or with
# text relocations, and then fails to load it. So no library dcmdb loads may have either.
_PT_DYNAMIC = 2
_PT_GNU_STACK = 0x6474E551
_PF_X = 1
_DT_TEXTREL = 22
_DT_FLAGS = 30
_DF_TEXTREL = 4
_SHARED_OBJECT = re.compile(r"\.so(\.|$)")


def _elf_problems(path: Path) -> list[str]:
    with path.open("rb") as elf:
        ident = elf.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF":
            return []
        wide = ident[4] == 2
        order = "<" if ident[5] == 1 else ">"
        if wide:
            phoff, phentsize, phnum = (
                struct.unpack_from(order + "Q", ident, 0x20)[0],
                *struct.unpack_from(order + "HH", ident, 0x36),
            )
        else:
            phoff, phentsize, phnum = (
                struct.unpack_from(order + "I", ident, 0x1C)[0],
                *struct.unpack_from(order + "HH", ident, 0x2A),
            )
        elf.seek(phoff)
        table = elf.read(phentsize * phnum)
        problems = []
        stack_flags = None
        for index in range(phnum):
            entry = table[index * phentsize : (index + 1) * phentsize]
            if wide:
                p_type, p_flags, p_offset, _, _, p_filesz = struct.unpack_from(
                    order + "IIQQQQ", entry
                )
            else:
                p_type, p_offset, _, _, p_filesz, _, p_flags = struct.unpack_from(
                    order + "IIIIIII", entry
                )
            if p_type == _PT_GNU_STACK:
                stack_flags = p_flags
            elif p_type == _PT_DYNAMIC:
                elf.seek(p_offset)
                dynamic = elf.read(p_filesz)
                pair, size = (order + "qQ", 16) if wide else (order + "iI", 8)
                for tag, value in struct.iter_unpack(pair, dynamic[: len(dynamic) // size * size]):
                    if tag == 0:
                        break
                    if tag == _DT_TEXTREL or (tag == _DT_FLAGS and value & _DF_TEXTREL):
                        problems.append("text relocations")
                        break
        if stack_flags is None or stack_flags & _PF_X:
            problems.append("executable stack")
        return problems


def _installed_binaries() -> Iterator[Path]:
    """Shared objects and programs of the installed packages (dcm2niix's binary among them)."""
    roots = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and (_SHARED_OBJECT.search(path.name) or path.name == "dcm2niix"):
                yield path


def test_no_installed_library_needs_writable_executable_memory() -> None:
    checked = 0
    offenders = []
    for path in _installed_binaries():
        checked += 1
        offenders += [f"{path}: {problem}" for problem in _elf_problems(path)]
    assert checked > 50, f"found only {checked} shared objects: is this the project's venv?"
    assert offenders == [], "MemoryDenyWriteExecute=yes would break:\n" + "\n".join(offenders)
