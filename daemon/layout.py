"""Names on the archive: physician folders and the PS3.10 File IDs below them.

Pure functions, no I/O: everything here is decided from strings, so the same input always gives
the same name. Callers (ingest, dicomdir, convert) check names against what exists.

Physician folders are shown to researchers over SMB by Windows, macOS and Linux clients, so a
folder name must be valid on all of them: the rules are listed on `physician_folder_name`.
Names the admin wrote (`unknown_folder`, alias folders, the template) are taken as given: they
were validated once, by `daemon.config`, when the daemon started.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

from daemon.model import NAME_MAX_BYTES, WINDOWS_DEVICE_NAMES, fold_case, person_name_key

__all__ = [
    "FILE_ID_COMPONENT",
    "alias_lookup",
    "file_id_component",
    "folder_key",
    "nifti_name",
    "physician_folder_name",
]

# PS3.5 6.2 (PN): a person name has up to five ^-separated components in this order.
_PN_COMPONENTS = ("family", "given", "middle", "prefix", "suffix")

# Reserved in file names by Windows (and so refused by SMB for Windows clients); '/' and NUL by
# POSIX. Control characters are handled by Unicode category below.
_FORBIDDEN_CHARS = frozenset('/\\:*?"<>|')

# Separators that a template leaves dangling around an empty component; stripped from both ends.
# '.' and ' ' are also illegal at the end of a Windows name, a leading '.' hides the folder on
# POSIX (and would match the `.tmp-*` veto), a leading '-' reads as an option on a command line.
_EDGE_SEPARATORS = " _.,;-"

# Windows device names: reserved in any case, with any extension ("con.txt", "nul.tar.gz"), and
# with spaces before the extension ("CON .txt"). COM0/LPT0 and the superscript digits are listed
# by Microsoft's "Naming Files, Paths, and Namespaces"; CONIN$/CONOUT$ by CreateFile (consoles).
# daemon.config refuses the same names where the admin writes a folder name (test_config checks
# that the two agree).

# A file name component is at most 255 bytes on ext4, XFS, btrfs and ZFS (NAME_MAX).

_DOT_RUN = re.compile(r"\.{2,}")
_UNDERSCORE_RUN = re.compile(r"[ _]*_[ _]*")  # a run of spaces and '_' holding at least one '_'
_SPACE_RUN = re.compile(r" {2,}")

# PS3.10 8.2: File ID components are 1-8 characters of upper-case A-Z, digits and '_'
# (PS3.12 Annex F: the ISO 9660 "d-characters"). Use with fullmatch().
FILE_ID_COMPONENT = re.compile(r"[A-Z0-9_]{1,8}")


def folder_key(folder_name: str) -> str:
    """Case-insensitive identity of a folder name.

    SMB clients are case-insensitive: two folders whose names differ only in case (or in
    Unicode normalization) are the same folder and must not both exist.
    """
    return fold_case(folder_name)


def _pn_components(name: str) -> dict[str, str]:
    """The five PS3.5 6.2 PN components of one component group, stripped, "" where absent."""
    parts = [part.strip() for part in name.strip().split("^")]
    if len(parts) > len(_PN_COMPONENTS):
        # Not conformant (PS3.5 6.2 allows five), but keep what was written: fold the excess
        # into the suffix rather than drop it.
        last = len(_PN_COMPONENTS) - 1
        parts[last:] = [" ".join(part for part in parts[last:] if part)]
    parts += [""] * (len(_PN_COMPONENTS) - len(parts))
    return dict(zip(_PN_COMPONENTS, parts, strict=True))


def _replace_unsafe_chars(text: str) -> str:
    """Map each character that is unsafe in a file name to '_' (or drop it, or a plain space)."""
    out: list[str] = []
    for char in text:
        category = unicodedata.category(char)
        if char in _FORBIDDEN_CHARS:
            out.append("_")
        elif category == "Cf":
            # Invisible format characters (zero-width space, BOM, soft hyphen, bidi overrides
            # that make a name display as another one): dropped, they carry no letters.
            continue
        elif category == "Zs":
            out.append(" ")  # no-break space, ideographic space (U+3000) ...
        elif category[0] == "C" or category in ("Zl", "Zp"):
            # Cc control characters (illegal on Windows, 0-31), Cs lone surrogates (not
            # encodable as UTF-8), Co private use and Cn unassigned or noncharacters.
            out.append("_")
        else:
            out.append(char)
    return "".join(out)


def _clean(text: str) -> str:
    """Safe characters, no '..', separators collapsed and stripped from both ends; "" allowed."""
    text = _replace_unsafe_chars(unicodedata.normalize("NFC", text))
    # Dropping a format character may join a letter and a combining mark: normalize again.
    text = unicodedata.normalize("NFC", text)
    text = _DOT_RUN.sub(".", text)  # never '..' (a parent-directory reference anywhere)
    text = _UNDERSCORE_RUN.sub("_", text)
    text = _SPACE_RUN.sub(" ", text)
    return text.strip(_EDGE_SEPARATORS)


def _fit(name: str, max_length: int) -> str:
    """Cut `name` to `max_length` characters and NAME_MAX UTF-8 bytes on a character boundary.

    A cut never separates a base character from its combining marks (unless it is the only
    character left); the result is NFC and stripped of edge separators again.
    """
    while len(name) > max_length or len(name.encode("utf-8")) > NAME_MAX_BYTES:
        cut = 0
        size = 0
        for char in name[:max_length]:
            size += len(char.encode("utf-8"))
            if size > NAME_MAX_BYTES:
                break
            cut += 1
        keep = cut
        while keep > 0 and unicodedata.combining(name[keep]):
            keep -= 1
        name = unicodedata.normalize("NFC", name[: keep or cut]).strip(_EDGE_SEPARATORS)
    return name


def _avoid_device_name(name: str, max_length: int) -> str:
    """Append '_' to a Windows device name ("CON" -> "CON_", "con.txt" -> "con_.txt").

    Windows decides by the part before the first dot, trailing spaces ignored (as in CPython's
    ntpath.isreserved), so the '_' goes after that part, replacing the spaces ("nul .txt" ->
    "nul_.txt"). If it does not fit, the last character of that part is dropped instead ("CON"
    with max_length 3 -> "CO").
    """
    base, dot, extension = name.partition(".")
    stem = base.rstrip(" ")
    if stem.upper() not in WINDOWS_DEVICE_NAMES:
        return name
    # The spaces before the dot go: "_ " would collapse to "_" when the name is cleaned again.
    padded = f"{stem}_{dot}{extension}"
    if len(padded) <= max_length and len(padded.encode("utf-8")) <= NAME_MAX_BYTES:
        return padded
    return stem[:-1] + name[len(stem) :]


def _safe_name(text: str, max_length: int) -> str:
    """`text` made into a folder name that is valid on POSIX and for Windows SMB clients."""
    return _avoid_device_name(_fit(_clean(text), max_length), max_length)


def physician_folder_name(
    referring_physician_name: str, *, template: str, unknown_folder: str, max_length: int
) -> str:
    """Display name for a new physician folder, from one decoded PN component group.

    The name is split into the PS3.5 6.2 (PN) components family^given^middle^prefix^suffix
    (each stripped; a sixth and later component is appended to the suffix) and formatted with
    `template` (str.format with {family} {given} {middle} {prefix} {suffix}). Then:

    - / \\ : * ? " < > | and control, surrogate, private-use and unassigned characters become
      '_'; invisible format characters (zero-width, BOM, bidi controls) are dropped; every
      Unicode space becomes ' '; the result is NFC;
    - runs of dots become one dot (no '..' anywhere); runs of spaces and '_' that hold a '_'
      become one '_'; runs of spaces become one space;
    - spaces, '_', '.', ',', ';' and '-' are stripped from both ends, so separators around an
      empty component vanish ("{family}_{given}" with no given name is "Smith") and the name
      never starts with '.' (hidden, or `.tmp-`) nor ends with '.' or ' ' (Windows);
    - at most `max_length` characters and 255 UTF-8 bytes, cut on a character boundary and
      stripped again;
    - a Windows device name (CON PRN AUX NUL CONIN$ CONOUT$ COM0-9 LPT0-9, any case, also
      before an extension) gets '_' after its device part: "CON_", "con_.txt".

    Letters of any script and the case written are kept: "Müller^Jürgen" -> "Müller_Jürgen",
    "SMITH^JOHN" -> "SMITH_JOHN" (with template "{family}_{given}"). An empty name, or one that
    cleans to nothing, gives `unknown_folder`, used as written.

    `template` and `unknown_folder` are used as daemon.config validated them; a template that
    config would refuse may raise from str.format. Raises ValueError for max_length < 1.
    """
    if max_length < 1:
        raise ValueError(f"folder name max_length must be at least 1, not {max_length}")
    components = _pn_components(referring_physician_name)
    if not any(components.values()):
        return unknown_folder
    return _safe_name(template.format(**components), max_length) or unknown_folder


def alias_lookup(aliases: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """Map person_name_key(spelling) -> folder name, from config [sorting.aliases].

    `aliases` maps a folder name to the PN spellings that belong in it; folder names are kept as
    written. Config has already refused unusable folder names and a spelling (same
    `person_name_key`) listed under two folders, so nothing is checked here.
    """
    return {
        person_name_key(spelling): folder
        for folder, spellings in aliases.items()
        for spelling in spellings
    }


def file_id_component(uid: str, attempt: int = 0) -> str:
    """Deterministic 8-character File ID component for the directory or file of `uid`.

    The first 8 base32 characters (A-Z 2-7, 40 bits) of sha256(uid), or of
    sha256(f"{uid}/{attempt}") for attempt > 0. A caller tries attempt 0, 1, 2, ... until the
    name is free in its parent, so paths are deterministic and collision-free.
    """
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, not {attempt}")
    text = uid if attempt == 0 else f"{uid}/{attempt}"
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    # PS3.10 8.2: 8 characters, all of them in A-Z 0-9 (base32 uses A-Z and 2-7). Five bytes
    # are exactly eight base32 characters: the same as cutting the full encoding, but cheaper.
    return base64.b32encode(digest[:5]).decode("ascii")


# NIfTI study folders and series file names: short enough that "<series>_<suffix>.nii.gz"
# stays under NAME_MAX and under Windows' 260-character paths for an ordinary share root.
NIFTI_NAME_MAX_LENGTH = 100


class _Blank:
    """An absent template field: formats as "" whatever the format spec ({SeriesNumber:03d})."""

    def __format__(self, format_spec: str) -> str:
        return ""


def nifti_name(
    template: str,
    fields: Mapping[str, str | int | None],
    *,
    fallback: str,
    attempt: int = 0,
    max_length: int = NIFTI_NAME_MAX_LENGTH,
) -> str:
    """A NIfTI study folder or series file name from a `[convert]` template.

    Values are DICOM text: '^' (the PN component separator) becomes ' ', an empty or absent
    value formats as "" (its separators are then stripped like a folder name's), and the
    result is made safe exactly like a physician folder name (see `physician_folder_name`).
    A name that cleans to nothing is `fallback`. Attempt n > 0 (the name was taken) appends
    "_<n + 1>", cutting the name to make room: "001_T1" -> "001_T1_2".
    """
    if attempt < 0:
        raise ValueError(f"attempt must be 0 or more, not {attempt}")
    values: dict[str, Any] = {}
    for key, value in fields.items():
        if value is None or value == "":
            values[key] = _Blank()
        elif isinstance(value, str):
            values[key] = value.replace("^", " ").strip()
        else:
            values[key] = value
    name = _safe_name(template.format(**values), max_length) or fallback
    if attempt == 0:
        return name
    suffix = f"_{attempt + 1}"
    return _safe_name(name, max_length - len(suffix)) + suffix
