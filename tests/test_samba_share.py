"""The shipped share (samba/dcmdb-share.conf) served by a real smbd, read with smbclient.

smbd listens on 127.0.0.1 only, on a random unprivileged port, with a private smb.conf whose
every state, lock, cache and password file lives in the test's temporary folder; the share
section is the shipped file with only its `path` pointed at the test archive. The archive is
filled by the real pipeline (`dcmdb ingest`, `dcmdb convert`, the daemon) with dcmdb's
production permissions: umask 027, group dcmdb (systemd/dcmdb.service). Researchers are
throwaway system users in the `dcmdb-readers` group, removed at the end.

Needs root (smbd, useradd) and the Debian packages samba and smbclient: skips without them,
fails under CI=true.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import json
import os
import pty
import random
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import termios
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import psutil
import pytest

from daemon.fsops import TEMP_PREFIX
from daemon.retention import TRASH_DIR
from tests.conftest import IN_CI, REPO, Daemon, Volume, dcmdb, drop_into, wait_for, write_config
from tests.factory import SeriesSpec, write_series

# They create and remove the same system groups, so one process at a time runs them: the
# `accounts` fixture holds a lock file for the machine (another pytest-xdist worker, or another
# pytest run, waits). The group mark alone does not do it: pytest-xdist 3.8's loadgroup renames
# items through `Item._nodeid`, which pytest 9 no longer reads, so the group is not kept.
pytestmark = pytest.mark.xdist_group("samba")
_MACHINE_LOCK = Path(tempfile.gettempdir()) / "dcmdb-samba-tests.lock"

SHARE_CONF = REPO / "samba" / "dcmdb-share.conf"
SHARE = "dcmdb"
ARCHIVE_GROUP = "dcmdb"  # force group = dcmdb: the group dcmdb's files belong to
READERS_GROUP = "dcmdb-readers"  # valid users = @dcmdb-readers
_TOOLS = ("smbd", "smbclient", "smbpasswd", "smbstatus")
_ACCOUNT_TOOLS = ("useradd", "userdel", "groupadd", "groupdel")
_CONVERT: dict[str, object] = {"settle_minutes": 0, "workers": 2, "timeout_seconds": 120}
# smbclient's `ls` line: name, attributes, size, date ("Sat Nov 21 22:57:43 2026").
_LS_ENTRY = re.compile(
    r"^  (?P<name>.+?)\s+(?P<attributes>[A-Z]*)\s+(?P<size>\d+)"
    r"\s+\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}$"
)


def _tool(name: str) -> str:
    # /usr/sbin is not on every PATH (smbd, useradd live there).
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        _missing(f"{name} is not installed (apt-get install samba smbclient)")
    return path


def _missing(message: str) -> NoReturn:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


# ---- accounts, the archive, smbd ---------------------------------------------------------


@dataclass(frozen=True)
class Account:
    name: str
    password: str


@dataclass(frozen=True)
class Accounts:
    reader: Account  # in dcmdb-readers
    outsider: Account  # a valid Samba account outside dcmdb-readers


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    """The groups of the shipped share (created only if missing, and then removed) and two
    throwaway system users without home or shell: a reader and an outsider."""
    if os.geteuid() != 0:
        _missing("the Samba share tests run smbd and create system users: they need root")
    for name in (*_TOOLS, *_ACCOUNT_TOOLS):
        _tool(name)
    with open(_MACHINE_LOCK, "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when closed
        yield from _throwaway_accounts()


def _throwaway_accounts() -> Iterator[Accounts]:
    created_groups: list[str] = []
    created_users: list[str] = []
    try:
        for group in (ARCHIVE_GROUP, READERS_GROUP):
            if not _group_exists(group):
                _run([_tool("groupadd"), "--system", group])
                created_groups.append(group)
        suffix = secrets.token_hex(4)
        reader = Account(f"dcmdbrd{suffix}", secrets.token_urlsafe(12))
        outsider = Account(f"dcmdbout{suffix}", secrets.token_urlsafe(12))
        for account, groups in ((reader, [READERS_GROUP]), (outsider, [])):
            command = [_tool("useradd"), "--system", "--user-group", "--no-create-home"]
            command += ["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]
            if groups:
                command += ["--groups", ",".join(groups)]
            _run([*command, account.name])
            created_users.append(account.name)
        yield Accounts(reader, outsider)
    finally:
        # Every removal is tried, whatever failed before it; then the failures are reported.
        # --force: userdel refuses a uid any process on the machine runs as (one in another
        # container sharing this kernel, say); ours are gone with smbd. Takes its own group.
        removals = [[_tool("userdel"), "--force", user] for user in created_users]
        removals += [[_tool("groupdel"), group] for group in reversed(created_groups)]
        failures = [problem for command in removals if (problem := _try(command))]
        if failures:
            pytest.fail("\n".join(failures))


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _run(command: list[str], stdin: str | None = None) -> None:
    problem = _try(command, stdin)
    if problem:
        pytest.fail(problem)


def _try(command: list[str], stdin: str | None = None) -> str:
    """Run command; what went wrong, or "" if nothing did."""
    result = subprocess.run(
        command, input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        return f"{' '.join(command)} failed: {result.stdout}{result.stderr}"
    return ""


@pytest.fixture
def volume(accounts: Accounts) -> Iterator[Volume]:
    """A dcmdb volume the share's users can reach, with dcmdb's production permissions.

    Not below tmp_path: pytest's base folder is root-only (0700), and smbd opens the archive
    as the reader. The volume root lets others only pass through (0711); the archive is group
    dcmdb and setgid, so everything dcmdb creates in it is group dcmdb; the umask is the unit's
    (UMask=0027: rw-r----- files, rwxr-x--- folders, nothing for others). incoming/, quarantine/
    and state/ stay root's alone.
    """
    root = Path(tempfile.mkdtemp(prefix="dcmdb-samba-"))
    old_umask = os.umask(0o027)
    try:
        root.chmod(0o711)
        for name in ("incoming", "archive", "quarantine", "state"):
            (root / name).mkdir()
        archive = root / "archive"
        os.chown(archive, 0, grp.getgrnam(ARCHIVE_GROUP).gr_gid)
        archive.chmod(0o2750)
        yield Volume(root, write_config(root, convert=_CONVERT))
    finally:
        os.umask(old_umask)
        shutil.rmtree(root)


@dataclass
class SambaServer:
    port: int
    conf: Path
    accounts: Accounts
    root: Account  # root with a Samba password: refused all the same (invalid users = root)
    log: Path

    def smbclient(
        self, account: Account | None, *commands: str
    ) -> subprocess.CompletedProcess[str]:
        """Run smbclient's commands (`;`-separated, as -c takes them) in one connection to the
        share; None connects as a guest."""
        return subprocess.run(
            [*self.client_args(account), "-c", "; ".join(commands)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def client_args(self, account: Account | None) -> list[str]:
        credentials = ["-N"] if account is None else ["-U", f"{account.name}%{account.password}"]
        # -s: the client also keeps its caches under the test's folder, not /var/cache/samba.
        return [
            _tool("smbclient"),
            f"//127.0.0.1/{SHARE}",
            "-p",
            str(self.port),
            "-s",
            str(self.conf),
            *credentials,
        ]

    def list_all(self, account: Account) -> tuple[set[str], str]:
        """Every path the share shows (folders end with /), and smbclient's output."""
        result = self.smbclient(account, "recurse", "ls")
        assert result.returncode == 0, result.stdout + result.stderr
        return _parse_listing(result.stdout), result.stdout

    def status(self) -> dict[str, object]:
        result = subprocess.run(
            [_tool("smbstatus"), "-s", str(self.conf), "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        status: dict[str, object] = json.loads(result.stdout)
        return status


@pytest.fixture
def samba(volume: Volume, accounts: Accounts, tmp_path: Path) -> Iterator[SambaServer]:
    """smbd serving the shipped share over the test archive, on 127.0.0.1 only; stopped at the
    end by its process group (smbd forks a process per connection and helpers)."""
    base = tmp_path / "samba"
    base.mkdir()
    port = _free_port()
    share = SHARE_CONF.read_text(encoding="utf-8")
    # Only the path changes; every other setting is tested as shipped.
    share, replaced = re.subn(
        r"(?m)^(\s*path\s*=).*$", lambda match: f"{match[1]} {volume.archive}", share
    )
    assert replaced == 1, f"{SHARE_CONF} must set path exactly once"
    (base / "dcmdb-share.conf").write_text(share, encoding="utf-8")
    conf = base / "smb.conf"
    conf.write_text(_global_section(base, port) + f"include = {base / 'dcmdb-share.conf'}\n")
    server = SambaServer(
        port, conf, accounts, Account("root", secrets.token_urlsafe(12)), base / "smbd.log"
    )
    for account in (accounts.reader, accounts.outsider, server.root):
        _run(
            [_tool("smbpasswd"), "-c", str(conf), "-s", "-a", account.name],
            stdin=f"{account.password}\n{account.password}\n",
        )
    with open(server.log, "wb") as log:
        process = subprocess.Popen(
            [
                _tool("smbd"),
                "--foreground",
                "--no-process-group",
                "--debug-stdout",
                "-s",
                str(conf),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: smbd and every child it forks
        )
    try:
        wait_for(
            lambda: process.poll() is not None or _listening(port),
            timeout=30,
            what=f"smbd to listen on 127.0.0.1:{port}",
        )
        if process.poll() is not None:
            pytest.fail(f"smbd exited at start-up:\n{server.log.read_text(errors='replace')}")
        yield server
    finally:
        _stop_process_group(process)
        print(f"---- smbd log (shown when the test fails) ----\n{_text(server.log)}")


def _global_section(base: Path, port: int) -> str:
    folders = {
        "private dir": "private",
        "lock directory": "lock",
        "state directory": "state",
        "cache directory": "cache",
        "pid directory": "run",
        "ncalrpc dir": "ncalrpc",
        "binddns dir": "bind-dns",
    }
    lines = ["[global]"]
    for key, folder in folders.items():
        (base / folder).mkdir()
        lines.append(f"    {key} = {base / folder}")
    lines += [
        "    server role = standalone server",
        f"    passdb backend = tdbsam:{base / 'private' / 'passdb.tdb'}",
        f"    smb ports = {port}",
        "    interfaces = 127.0.0.1",
        "    bind interfaces only = yes",
        "    disable netbios = yes",
        f"    log file = {base / 'smbd.%m.log'}",
        "    load printers = no",
        "    printing = bsd",
        "    printcap name = /dev/null",
        "    disable spoolss = yes",
        # smbclient needs no RPC service here: no samba-dcerpcd is started behind our back.
        "    rpc start on demand helpers = no",
        "    unix charset = UTF-8",
        "",
    ]
    return "\n".join(lines)


def _free_port() -> int:
    for _attempt in range(50):
        port = random.randint(44500, 44999)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            return port
    pytest.fail("no free port in 44500-44999 on 127.0.0.1")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the group smbd leads (its pid), then SIGKILL, by id, to any it left."""
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    _gone, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _parse_listing(output: str) -> set[str]:
    """smbclient's recursive `ls` as relative paths ('/'-separated; folders end with '/')."""
    paths: set[str] = set()
    folder = ""
    for line in output.splitlines():
        if line.startswith("\\"):
            folder = line.strip("\\").replace("\\", "/")
            continue
        entry = _LS_ENTRY.match(line)
        if entry is None or entry["name"] in (".", ".."):
            continue
        path = f"{folder}/{entry['name']}" if folder else entry["name"]
        paths.add(path + "/" if "D" in entry["attributes"] else path)
    return paths


def _snapshot(archive: Path) -> dict[Path, bytes | None]:
    """Every path below archive with its bytes (None for a folder)."""
    return {path: None if path.is_dir() else path.read_bytes() for path in archive.rglob("*")}


def _visible_on_disk(archive: Path) -> set[str]:
    """What the share must show: the archive without names starting with a dot (or below
    one)."""
    paths: set[str] = set()
    for path in archive.rglob("*"):
        relative = path.relative_to(archive)
        if any(part.startswith(".") for part in relative.parts):
            continue
        paths.add(relative.as_posix() + ("/" if path.is_dir() else ""))
    return paths


# ---- filling the archive by the real pipeline --------------------------------------------


def _ingest(volume: Volume, source: Path) -> None:
    result = dcmdb(volume, "ingest", str(source))
    assert result.returncode == 0, result.stdout + result.stderr


def _fill_archive(volume: Volume, source: Path) -> None:
    """Two physicians (one with a name beyond ASCII), a series each, DICOMDIRs, and NIfTI."""
    write_series(source / "smith", SeriesSpec(series_description="T1 MPRAGE", slices=6))
    write_series(
        source / "mueller",
        SeriesSpec(
            referring_physician="Müller^Jürgen",
            specific_character_set="ISO_IR 192",
            patient_id="PID002",
            study_description="Knee",
            series_description="PD",
            slices=4,
        ),
    )
    _ingest(volume, source)
    result = dcmdb(volume, "convert")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "converted 2" in result.stdout, result.stdout


def _dict(value: object) -> dict[str, object]:
    assert isinstance(value, dict), value
    return value


def _dicts(value: object) -> list[dict[str, object]]:
    """The values of a JSON object of objects (smbstatus keys them by ids)."""
    return [_dict(item) for item in _dict(value).values()]


def _plain_archive(archive: Path) -> None:
    """A physician folder's shape made by hand, for tests about names and rights only (the
    share does not look inside files): cheaper than the pipeline."""
    files = {
        "Smith_John/DICOMDIR": b"DICM a DICOMDIR",
        "Smith_John/DICOM/AAAAAAAA/BBBBBBBB/CCCCCCCC/DDDDDDDD": b"DICM an instance",
        "Smith_John/NIFTI/PID001_20260101_Brain/001_T1.nii.gz": b"a volume",
        "Müller_Jürgen/DICOMDIR": b"DICM another DICOMDIR",
    }
    for name, data in files.items():
        path = archive / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


# ---- the tests ---------------------------------------------------------------------------


def test_share_shows_exactly_the_archive_and_serves_dicomdir_nifti_and_instances_byte_for_byte(
    samba: SambaServer, volume: Volume, tmp_path: Path
) -> None:
    _fill_archive(volume, tmp_path / "source")
    reader = samba.accounts.reader

    listed, output = samba.list_all(reader)

    # Every folder and file dcmdb made visible, and nothing else; names as written (UTF-8,
    # spaces, no mangled 8.3 aliases).
    assert listed == _visible_on_disk(volume.archive), output
    nifti = "Smith_John/NIFTI/PID001_20260101_Brain/001_T1 MPRAGE.nii.gz"
    assert nifti in listed
    assert "Müller_Jürgen/DICOMDIR" in listed
    assert "Müller_Jürgen/NIFTI/PID002_20260101_Knee/001_PD.nii.gz" in listed
    instance = max(
        path for path in listed if path.startswith("Smith_John/DICOM/") and path[-1] != "/"
    )
    downloads = {
        "Smith_John/DICOMDIR": tmp_path / "smith.DICOMDIR",
        "Müller_Jürgen/DICOMDIR": tmp_path / "mueller.DICOMDIR",
        nifti: tmp_path / "t1.nii.gz",
        instance: tmp_path / "instance.dcm",
        # Lookups ignore case, as dcmdb's folder names do: smith_john is Smith_John.
        "smith_john/dicomdir": tmp_path / "any-case.DICOMDIR",
    }
    result = samba.smbclient(
        reader, *(f'get "{remote}" "{local}"' for remote, local in downloads.items())
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for remote, local in downloads.items():
        original = volume.archive / remote
        if remote == "smith_john/dicomdir":
            original = volume.archive / "Smith_John" / "DICOMDIR"
        assert local.read_bytes() == original.read_bytes(), remote


def test_share_is_read_only_for_its_readers(
    samba: SambaServer, volume: Volume, tmp_path: Path
) -> None:
    _plain_archive(volume.archive)
    before = _snapshot(volume.archive)
    upload = tmp_path / "upload.txt"
    upload.write_text("not welcome\n")
    attempts = {
        "put": f'put "{upload}" upload.txt',
        "overwrite": f'put "{upload}" Smith_John/DICOMDIR',
        "mkdir": "mkdir newfolder",
        "rm": "rm Smith_John/DICOMDIR",
        "rename": "rename Smith_John/DICOMDIR Smith_John/OLD",
        "rmdir": "deltree Müller_Jürgen",
    }
    for what, command in attempts.items():
        result = samba.smbclient(samba.accounts.reader, command)
        output = result.stdout + result.stderr
        # (smbclient exits 0 after some failed commands: the status it prints is the answer.)
        assert "NT_STATUS_ACCESS_DENIED" in output, f"{what}: {output}"

    assert _snapshot(volume.archive) == before


def test_only_dcmdb_readers_get_in_no_guest_no_outsider_no_root(
    samba: SambaServer, volume: Volume, tmp_path: Path
) -> None:
    _plain_archive(volume.archive)
    accounts = samba.accounts
    # Each has a valid Samba login (or asks for a guest one): refused at the share.
    refused = {
        "guest": samba.smbclient(None, "ls"),
        "outsider": samba.smbclient(accounts.outsider, "ls"),
        "root": samba.smbclient(samba.root, "ls"),
    }
    for who, result in refused.items():
        output = result.stdout + result.stderr
        assert result.returncode != 0, f"{who} listed the share: {output}"
        # Logged in (or as a guest), then turned away at the share itself.
        assert "tree connect failed: NT_STATUS_ACCESS_DENIED" in output, f"{who}: {output}"
        assert "DICOMDIR" not in output
    assert "Smith_John/DICOMDIR" in samba.list_all(accounts.reader)[0]


def test_temp_files_convert_folders_and_trash_never_appear_nor_open(
    samba: SambaServer, volume: Volume, tmp_path: Path
) -> None:
    _plain_archive(volume.archive)
    folder = volume.archive / "Smith_John"
    hidden = {
        folder / f"{TEMP_PREFIX}DICOMDIR-4242": b"half a DICOMDIR",
        folder / "NIFTI" / f"{TEMP_PREFIX}convert-1" / "001_T1.nii.gz": b"half a volume",
        volume.archive / TRASH_DIR / "7" / "DICOM" / "ABCDEFGH": b"a study being deleted",
        folder / ".DS_Store": b"a Mac was here",
        folder / "DICOM" / ".TMP-UPPER": b"case does not matter",
    }
    for path, data in hidden.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    reader = samba.accounts.reader

    listed, output = samba.list_all(reader)

    assert listed == _visible_on_disk(volume.archive)
    assert "Smith_John/DICOMDIR" in listed
    for word in (".tmp", TRASH_DIR, ".DS_Store"):
        assert word.casefold() not in output.casefold(), output
    # Vetoed names cannot be opened or entered either, even when guessed.
    guesses = [
        f'get "Smith_John/{TEMP_PREFIX}DICOMDIR-4242" "{tmp_path / "guess1"}"',
        f'get "Smith_John/NIFTI/{TEMP_PREFIX}convert-1/001_T1.nii.gz" "{tmp_path / "guess2"}"',
        f'ls "{TRASH_DIR}/*"',
        f'get "{TRASH_DIR}/7/DICOM/ABCDEFGH" "{tmp_path / "guess3"}"',
        f'ls "Smith_John/NIFTI/{TEMP_PREFIX}convert-1/*"',
    ]
    for guess in guesses:
        result = samba.smbclient(reader, guess)
        assert result.returncode != 0, f"{guess}: {result.stdout}{result.stderr}"
        assert "NOT_FOUND" in result.stdout + result.stderr, result.stdout + result.stderr
    assert not any(tmp_path.glob("guess*"))


class SmbSession:
    """One interactive smbclient connection held open across local changes.

    On a pseudo-terminal smbclient reads one command at a time and prints its prompt when it
    is done, which is how `run` knows a command's output is complete.
    """

    _PROMPT = re.compile(rb"smb: \\[^\r\n>]*> $")
    _ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

    def __init__(self, arguments: list[str]) -> None:
        self._terminal, client = pty.openpty()
        settings = termios.tcgetattr(client)
        settings[3] &= ~termios.ECHO  # do not echo the commands back
        termios.tcsetattr(client, termios.TCSANOW, settings)
        self.process = subprocess.Popen(
            arguments,
            stdin=client,
            stdout=client,
            stderr=client,
            env={**os.environ, "TERM": "dumb"},
            start_new_session=True,
        )
        os.close(client)
        self.greeting = self._read_to_prompt()

    def run(self, command: str) -> str:
        os.write(self._terminal, command.encode() + b"\n")
        return self._read_to_prompt()

    def _read_to_prompt(self, timeout: float = 60.0) -> str:
        received = b""
        while not self._PROMPT.search(received):
            ready, _, _ = select.select([self._terminal], [], [], timeout)
            if not ready:
                pytest.fail(f"smbclient gave no prompt within {timeout} s: {received!r}")
            try:
                chunk = os.read(self._terminal, 65536)
            except OSError:  # EIO: smbclient exited
                chunk = b""
            if not chunk:
                pytest.fail(f"smbclient exited: {received.decode(errors='replace')}")
            received += chunk
        text = self._PROMPT.sub(b"", received).decode(errors="replace")
        return self._ESCAPES.sub("", text).replace("\r\n", "\n")

    def close(self) -> None:
        if self.process.poll() is None:
            os.write(self._terminal, b"quit\n")
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        os.close(self._terminal)


def test_dicomdir_replaced_while_a_reader_holds_it_open_is_read_new_and_new_files_appear(
    samba: SambaServer, volume: Volume, tmp_path: Path
) -> None:
    write_series(tmp_path / "first", SeriesSpec(series_description="T1", slices=3))
    _ingest(volume, tmp_path / "first")
    dicomdir = volume.archive / "Smith_John" / "DICOMDIR"
    first = dicomdir.read_bytes()
    first_inode = dicomdir.stat().st_ino
    session = SmbSession(samba.client_args(samba.accounts.reader))
    try:
        opened = session.run("open Smith_John/DICOMDIR")
        handle = re.search(r"fnum (\d+)", opened)
        assert handle is not None, opened
        # While the handle is open, dcmdb files another series and rewrites the DICOMDIR: a
        # hidden temp name, then a rename over the open file (neither may fail or wait).
        write_series(
            tmp_path / "second", SeriesSpec(series_number=2, series_description="T2", slices=3)
        )
        _ingest(volume, tmp_path / "second")
        assert dicomdir.read_bytes() != first

        session.run("recurse")
        listed = _parse_listing(session.run("ls"))
        fetched = tmp_path / "fetched.DICOMDIR"
        got = session.run(f'get Smith_John/DICOMDIR "{fetched}"')

        assert fetched.read_bytes() == dicomdir.read_bytes(), got
        assert listed == _visible_on_disk(volume.archive)  # the new series' files included
        status = samba.status()
        # The reader still holds the old file (its inode), open for reading only.
        (opened_file,) = _dicts(status["open_files"])
        assert opened_file["filename"] == "Smith_John/DICOMDIR"
        assert _dict(opened_file["fileid"])["inode"] == first_inode != dicomdir.stat().st_ino
        (open_handle,) = _dicts(opened_file["opens"])
        assert _dict(open_handle["access_mask"])["text"] == "R"
        # Patient data in transit: the connection to the share is encrypted (SMB3).
        (tree_connect,) = _dicts(status["tcons"])
        assert tree_connect["service"] == SHARE
        assert _dict(tree_connect["encryption"])["degree"] == "full"
        assert str(_dict(tree_connect["encryption"])["cipher"]).startswith("AES-")
        assert "NT_STATUS" not in session.run(f"close {handle[1]}")
    finally:
        session.close()


@pytest.fixture
def incoming_elsewhere(volume: Volume) -> Iterator[Path]:
    """incoming/ on another filesystem than the archive when there is one (/dev/shm): every
    instance then goes through a `.tmp-*` copy in the archive, as from a network-mounted
    incoming/. Otherwise the volume's own (instances are hard-linked in; only DICOMDIRs pass
    through temp names). Requested before start_daemon, so removed after the daemon stops."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(volume.archive).st_dev:
        yield volume.incoming
        return
    folder = Path(tempfile.mkdtemp(prefix="dcmdb-samba-", dir=shm))
    try:
        (folder / "incoming").mkdir()
        yield folder / "incoming"
    finally:
        shutil.rmtree(folder)


def test_repeated_listings_during_an_ingest_burst_never_show_a_temp_name(
    samba: SambaServer,
    volume: Volume,
    incoming_elsewhere: Path,
    start_daemon: Callable[[], Daemon],
) -> None:
    incoming = incoming_elsewhere
    volume.config = write_config(volume.root, paths={"incoming": str(incoming)}, convert=_CONVERT)
    staging = incoming.parent / "staging"
    batches = []
    for number in range(1, 7):
        spec = SeriesSpec(
            referring_physician=("Smith^John", "Jones^Ann")[number % 2],
            series_number=number,
            series_description=f"S{number}",
            slices=30,
        )
        batches.append(write_series(staging / str(number), spec))
    files = [path for batch in batches for path in batch]
    start_daemon()
    reader = samba.accounts.reader
    archived_at_listing: list[int] = []

    def check_listing() -> None:
        archived_at_listing.append(volume.count("instances"))
        result = samba.smbclient(reader, "recurse", "ls")
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert ".tmp" not in output.casefold(), output
        assert TRASH_DIR not in output, output

    for start in range(0, len(files), 15):
        drop_into(incoming, files[start : start + 15], subfolder=f"wave{start}")
        check_listing()

    def burst_done() -> bool:
        check_listing()
        archived = volume.count("instances") == len(files)
        return archived and not any(path.is_file() for path in incoming.rglob("*"))

    wait_for(burst_done, timeout=120, interval=0.0, what="the burst to be archived")
    dicomdirs = [volume.archive / name / "DICOMDIR" for name in ("Smith_John", "Jones_Ann")]
    wait_for(
        lambda: (
            all(path.is_file() for path in dicomdirs)
            and samba.list_all(reader)[0] == _visible_on_disk(volume.archive)
        ),
        timeout=30,
        what="the share to show the whole burst with its DICOMDIRs",
    )
    listed, output = samba.list_all(reader)
    shown = [path for path in listed if "/DICOM/" in path and not path.endswith("/")]
    assert len(shown) == len(files), output
    # Listings really ran while the burst was being filed, not only before or after it.
    assert any(0 < archived < len(files) for archived in archived_at_listing), archived_at_listing
