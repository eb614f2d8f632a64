"""Tests for daemon.config: real config files in tmp_path, loaded the way the daemon loads them."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
import tomllib
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from zoneinfo import ZoneInfo

import dcm2niix
import pytest
import tzlocal
from apscheduler.triggers.cron import CronTrigger

from daemon.config import (
    EX_CONFIG,
    SERIES_TEMPLATE_FIELDS,
    STUDY_TEMPLATE_FIELDS,
    ConfigError,
    ConvertConfig,
    IngestConfig,
    ListenerConfig,
    LoggingConfig,
    MetricsConfig,
    PathsConfig,
    RetentionConfig,
    RetrieveConfig,
    SortingConfig,
    SpaceThreshold,
    find_config_file,
    load_config,
    parse_size,
    parse_threshold,
    render_config,
)
from daemon.layout import alias_lookup, folder_key, physician_folder_name
from daemon.model import person_name_key

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO / "config.toml"

VALID_PATHS = """\
[paths]
incoming = "var/incoming"
archive = "var/archive"
quarantine = "var/quarantine"
state = "var/state"
"""


def write_config(folder: Path, body: str, *, with_paths: bool = True) -> Path:
    """Write config.toml into ``folder``: a valid [paths] section (unless told not to) + body."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text((VALID_PATHS + "\n" if with_paths else "") + body, encoding="utf-8")
    return path


def load_errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value.errors


def toml_string(text: str) -> str:
    """``text`` as a TOML basic string (JSON's escapes are TOML's, for non-surrogate text)."""
    return json.dumps(text, ensure_ascii=False)


def toml_key(text: str) -> str:
    """``text`` as a TOML key, quoted when it is not bare (as config's error messages show it)."""
    return text if re.fullmatch(r"[A-Za-z0-9_-]+", text) else toml_string(text)


_TABLE_HEADER = re.compile(r"^(?:# )?\[(?P<name>[^\]]+)\]$")
_EXAMPLE_LINE = re.compile(r'^# ((?:[A-Za-z0-9_-]+|"[^"]*") = .+)$')


def uncomment_example(text: str, table: str) -> str:
    """``text`` (the shipped file) with the example of ``[table]`` uncommented: its header when
    it is commented out, and each ``# key = value`` line up to the next table."""
    lines: list[str] = []
    inside = False
    for line in text.splitlines():
        if header := _TABLE_HEADER.match(line):
            inside = header["name"] == table
            lines.append(line.removeprefix("# ") if inside else line)
        elif inside and (example := _EXAMPLE_LINE.match(line)):
            lines.append(example[1])
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def executable(path: Path, mode: int = 0o755) -> Path:
    """A small shell script at ``path`` with ``mode``: a stand-in program the config can name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    path.chmod(mode)
    return path


# --- the shipped file ---------------------------------------------------------------------------


def test_shipped_config_loads_with_every_path_under_the_repos_var_folder() -> None:
    config = load_config(SHIPPED_CONFIG)

    var = REPO / "var"
    assert config.source == SHIPPED_CONFIG
    assert config.paths == PathsConfig(
        incoming=var / "incoming",
        archive=var / "archive",
        quarantine=var / "quarantine",
        state=var / "state",
    )


def test_shipped_config_lists_every_key_with_its_default_value() -> None:
    document = tomllib.loads(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    config = load_config(SHIPPED_CONFIG)

    for section in (
        IngestConfig,
        SortingConfig,
        LoggingConfig,
        PathsConfig,
        ConvertConfig,
        MetricsConfig,
        ListenerConfig,
        RetrieveConfig,
    ):
        name = section.__name__.removesuffix("Config").lower()
        assert set(document[name]) == {
            field.name for field in dataclasses.fields(section) if field.init
        }
    assert config.ingest == IngestConfig()
    assert config.sorting == SortingConfig()
    assert config.logging == LoggingConfig()
    assert config.convert == ConvertConfig()
    # An open port is the admin's decision: the shipped file leaves the endpoint off.
    assert config.metrics == MetricsConfig()
    assert not config.metrics.enabled
    # Deleting studies cannot be undone: the shipped file leaves retention off.
    assert "retention" not in document
    assert config.retention == RetentionConfig()
    assert not config.retention.enabled


def test_shipped_retention_example_lists_every_key_and_loads_once_uncommented(
    tmp_path: Path,
) -> None:
    text = uncomment_example(SHIPPED_CONFIG.read_text(encoding="utf-8"), "retention")
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")

    document = tomllib.loads(text)
    retention = load_config(path).retention

    assert set(document["retention"]) == {
        field.name for field in dataclasses.fields(RetentionConfig) if field.init
    }
    assert retention.enabled
    assert retention.low_free_threshold == SpaceThreshold("percent", 10.0)
    assert retention.target_free_threshold == SpaceThreshold("percent", 15.0)
    # Every other key is shown with its default.
    assert dataclasses.replace(retention, low_free="", target_free="") == RetentionConfig()


def test_shipped_alias_example_loads_once_uncommented(tmp_path: Path) -> None:
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    uncommented = uncomment_example(text, "sorting.aliases")
    assert uncommented != text
    path = tmp_path / "config.toml"
    path.write_text(uncommented, encoding="utf-8")

    aliases = load_config(path).sorting.aliases

    assert aliases["Smith_John"][:2] == ("SMITH^JOHN", "SMITH^J")
    assert "Van der Berg" in aliases


# --- collecting mistakes ------------------------------------------------------------------------


def test_three_mistakes_are_all_reported_with_their_key_paths(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        """
[ingest]
settle_seconds = "ten"
setle_seconds = 5

[logging]
level = "loud"
""",
    )

    with pytest.raises(ConfigError) as raised:
        load_config(path)

    errors = raised.value.errors
    assert len(errors) == 3
    assert 'ingest.settle_seconds: expected a number >= 0, got "ten"' in errors
    assert "ingest.setle_seconds: unknown key; did you mean settle_seconds?" in errors
    assert any(error.startswith('logging.level: expected one of "debug"') for error in errors)
    assert str(raised.value).splitlines() == errors


def test_config_error_exit_status_is_ex_config() -> None:
    assert EX_CONFIG == 78


def test_unknown_section_is_an_error_that_suggests_the_closest_section(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[ingset]\nsettle_seconds = 5\n")

    assert load_errors(path) == ["ingset: unknown section; did you mean ingest?"]


def test_top_level_key_that_belongs_in_a_section_says_which_section(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("batch_size = 10\n" + VALID_PATHS, encoding="utf-8")

    assert load_errors(path) == ["batch_size: unknown top-level key; it belongs under [ingest]"]


def test_missing_paths_section_is_reported(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[ingest]\nbatch_size = 10\n", with_paths=False)

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith("paths: missing required section [paths]")


def test_each_missing_paths_key_is_reported(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[paths]\nincoming = "in"\nstate = "st"\n', with_paths=False)

    errors = load_errors(path)

    assert [error.split(":")[0] for error in errors] == ["paths.archive", "paths.quarantine"]
    assert all("missing required key" in error for error in errors)


def test_bool_is_not_accepted_as_a_number(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[ingest]\nbatch_size = true\nsettle_seconds = true\n")

    assert load_errors(path) == [
        "ingest.settle_seconds: expected a number >= 0, got true",
        "ingest.batch_size: expected an integer from 1 to 10000, got true",
    ]


def test_numbers_out_of_range_name_the_allowed_range(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "[ingest]\nbatch_size = 0\nparse_workers = -1\npolling_interval_seconds = 0\n"
        "settle_seconds = nan\n[sorting]\nmax_folder_length = 7\n",
    )

    assert sorted(load_errors(path)) == [
        "ingest.batch_size: expected an integer from 1 to 10000, got 0",
        "ingest.parse_workers: expected an integer >= 0, got -1",
        "ingest.polling_interval_seconds: expected a number > 0, got 0",
        "ingest.settle_seconds: expected a number >= 0, got nan",
        "sorting.max_folder_length: expected an integer from 8 to 200, got 7",
    ]


def test_integer_seconds_are_accepted_and_stored_as_floats(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[ingest]\nsettle_seconds = 0\nrescan_seconds = 30\n")

    ingest = load_config(path).ingest

    assert ingest.settle_seconds == 0.0
    assert isinstance(ingest.rescan_seconds, float)
    assert ingest.rescan_seconds == 30.0


def test_incomplete_timeout_shorter_than_settle_time_is_rejected(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, "[ingest]\nsettle_seconds = 60\nincomplete_timeout_seconds = 30\n"
    )

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith(
        "ingest.incomplete_timeout_seconds: must be at least ingest.settle_seconds (60)"
    )


def test_enum_values_are_case_insensitive_and_stored_lowercase(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[logging]\nlevel = "DEBUG"\nformat = "Json"\n[ingest]\nobserver = "Polling"\n'
    )

    config = load_config(path)

    assert config.logging == LoggingConfig(level="debug", format="json")
    assert config.ingest.observer == "polling"


def test_toml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[ingest]\nsettle_seconds = ten\n")

    errors = load_errors(path)

    # VALID_PATHS is 5 lines, then a blank line, then [ingest] on 7: the bad value is on 8.
    assert errors == [f"{path}: TOML syntax error at line 8, column 18: Invalid value"]


def test_unreadable_config_path_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"

    errors = load_errors(missing)

    assert len(errors) == 1
    assert errors[0].startswith(f"{missing}: cannot read")


# --- paths --------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_folder_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_folder = tmp_path / "etc"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    path = write_config(config_folder, "")
    monkeypatch.chdir(elsewhere)

    paths = load_config(Path("../etc/config.toml")).paths

    assert paths.incoming == config_folder.resolve() / "var" / "incoming"
    assert paths.state == config_folder.resolve() / "var" / "state"
    assert load_config(Path("../etc/config.toml")).source == path


def test_tilde_in_a_path_expands_to_the_home_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    path = write_config(
        tmp_path / "conf",
        '[paths]\nincoming = "~/in"\narchive = "/srv/dcm/archive"\n'
        'quarantine = "q"\nstate = "~/state"\n',
        with_paths=False,
    )

    paths = load_config(path).paths

    assert paths.incoming == home.resolve() / "in"
    assert paths.state == home.resolve() / "state"
    assert paths.archive == Path("/srv/dcm/archive")
    assert paths.quarantine == (tmp_path / "conf" / "q").resolve()


def test_archive_inside_incoming_is_rejected(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[paths]\nincoming = "in"\narchive = "in/archive"\nquarantine = "q"\nstate = "s"\n',
        with_paths=False,
    )

    errors = load_errors(path)

    incoming = tmp_path.resolve() / "in"
    assert errors == [
        f"paths.archive: must not be inside paths.incoming ({incoming / 'archive'} is inside "
        f"{incoming})"
    ]


def test_incoming_inside_state_is_rejected_whichever_comes_first(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[paths]\nincoming = "s/in"\narchive = "a"\nquarantine = "q"\nstate = "s"\n',
        with_paths=False,
    )

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith("paths.incoming: must not be inside paths.state")


def test_the_same_folder_twice_is_rejected(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[paths]\nincoming = "in"\narchive = "a"\nquarantine = "./a/"\nstate = "s"\n',
        with_paths=False,
    )

    assert load_errors(path) == [
        f"paths.quarantine: must differ from paths.archive (both are {tmp_path.resolve() / 'a'})"
    ]


def test_incoming_that_holds_the_config_file_is_rejected(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[paths]\nincoming = "."\narchive = "../a"\nquarantine = "../q"\nstate = "../s"\n',
        with_paths=False,
    )

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith("paths.incoming: must not contain the config file")


def test_a_path_that_is_not_a_string_is_reported(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[paths]\nincoming = 5\narchive = ""\nquarantine = "q"\nstate = "s"\n',
        with_paths=False,
    )

    assert load_errors(path) == [
        "paths.incoming: expected a path (a non-empty string), got 5",
        'paths.archive: expected a path (a non-empty string), got ""',
    ]


# --- sorting ------------------------------------------------------------------------------------


def test_template_with_an_unknown_placeholder_names_the_placeholder(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[sorting]\nfolder_template = "{family}_{givn}"\n')

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith("sorting.folder_template: unknown placeholder {givn}; allowed:")
    assert errors[0].endswith("did you mean {given}?")


def test_template_problems_are_each_reported(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[sorting]\nfolder_template = "{family!r}/{0}"\n',
    )

    errors = load_errors(path)

    assert len(errors) == 3
    assert any("placeholder {family!r}: conversions and format specs" in e for e in errors)
    assert any("unknown placeholder {0}" in e for e in errors)
    assert any("text outside placeholders must not contain /" in e for e in errors)


def test_template_without_placeholders_or_with_a_lone_brace_is_rejected(tmp_path: Path) -> None:
    no_placeholder = write_config(tmp_path / "a", '[sorting]\nfolder_template = "lab"\n')
    lone_brace = write_config(tmp_path / "b", '[sorting]\nfolder_template = "{family"\n')

    assert "has no placeholder" in load_errors(no_placeholder)[0]
    assert "is not a valid template" in load_errors(lone_brace)[0]


def test_unknown_folder_with_a_leading_dot_or_a_separator_is_rejected(tmp_path: Path) -> None:
    dotted = write_config(tmp_path / "a", '[sorting]\nunknown_folder = ".unknown"\n')
    slashed = write_config(tmp_path / "b", '[sorting]\nunknown_folder = "no/one"\n')
    empty = write_config(tmp_path / "c", '[sorting]\nunknown_folder = ""\n')

    assert load_errors(dotted) == [
        "sorting.unknown_folder: must not start with '.' (a hidden folder)"
    ]
    assert load_errors(slashed) == ["sorting.unknown_folder: must not contain /"]
    assert load_errors(empty) == ["sorting.unknown_folder: must not be empty"]


def test_aliases_load_as_folder_to_spellings(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[sorting.aliases]\nSmith_John = ["SMITH^JOHN", " SMITH^J "]\n"Dr Who" = ["WHO^"]\n',
    )

    aliases = load_config(path).sorting.aliases

    assert dict(aliases) == {"Smith_John": ("SMITH^JOHN", "SMITH^J"), "Dr Who": ("WHO^",)}


def test_the_same_alias_spelling_under_two_folders_is_rejected(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "[sorting.aliases]\n"
        'Smith_John = ["SMITH^JOHN", "SMITH^J"]\n'
        'Smith_Jane = ["SMITH^JANE", "smith ^ j"]\n',
    )

    assert load_errors(path) == [
        'sorting.aliases.Smith_Jane[1]: "smith ^ j" is already listed under '
        'sorting.aliases.Smith_John as "SMITH^J"; a spelling can lead to one folder only'
    ]


def test_alias_folders_follow_the_folder_name_rules(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[sorting.aliases]\n"a:b" = ["A^B"]\nUNKNOWN = ["X^Y"]\nok = "SMITH^J"\nalso_ok = [3]\n',
    )

    assert load_errors(path) == [
        'sorting.aliases."a:b": folder name must not contain :',
        'sorting.aliases.UNKNOWN: folder name must differ from sorting.unknown_folder ("unknown")',
        'sorting.aliases.ok: expected an array of Referring Physician spellings (["SMITH^J", ...]),'
        ' got "SMITH^J"',
        "sorting.aliases.also_ok[0]: expected a string, got 3",
    ]


# --- sorting: config is the only check of what layout is given ----------------------------------

# Windows device names, as Microsoft lists them; layout renames a generated name that is one.
DEVICE_NAMES = ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"] + [
    f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789¹²³"
]


@pytest.mark.parametrize(
    ("unknown_folder", "problem"),
    [
        ("", "must not be empty"),
        (".unknown", "must not start with '.'"),
        ("..", "must not start with '.'"),
        ("a/b", "must not contain /"),
        ("a:b", "must not contain :"),
        ("x\x00y", "must not contain control characters"),
        ("x\x85y", "must not contain control characters"),
        ("unknown ", "must not end with '.' or a space"),
        ("unknown.", "must not end with '.' or a space"),
        ("CON", "must not be the Windows device name CON"),
        ("nul.txt", "must not be the Windows device name NUL"),
        ("Com1 .tar.gz", "must not be the Windows device name COM1"),
        ("lpt¹", "must not be the Windows device name LPT¹"),
        pytest.param(
            "u" * 65, "is 65 characters long, over sorting.max_folder_length (64)", id="65-chars"
        ),
        pytest.param(
            "😀" * 64,
            "is 256 bytes long in UTF-8, over the 255 a file name may have",
            id="256-bytes",
        ),
    ],
)
def test_unusable_unknown_folder_is_rejected_with_its_key_path(
    tmp_path: Path, unknown_folder: str, problem: str
) -> None:
    path = write_config(tmp_path, f"[sorting]\nunknown_folder = {toml_string(unknown_folder)}\n")

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"sorting.unknown_folder: {problem}")


@pytest.mark.parametrize(
    "folder", ["", "..", "../etc", "a/b", ".hidden", "trailing.", "CON", "aux.x", "x:y", "a\tb"]
)
def test_alias_folder_that_no_client_can_use_is_rejected_with_its_key_path(
    tmp_path: Path, folder: str
) -> None:
    path = write_config(tmp_path, f'[sorting.aliases]\n{toml_string(folder)} = ["SMITH^JOHN"]\n')

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"sorting.aliases.{toml_key(folder)}: folder name must")


def test_alias_folder_longer_than_255_bytes_is_rejected(tmp_path: Path) -> None:
    folder = "山" * 86  # 258 bytes in 86 characters
    path = write_config(
        tmp_path, f'[sorting]\nmax_folder_length = 200\n[sorting.aliases]\n"{folder}" = ["YAMA^"]\n'
    )

    assert load_errors(path) == [
        f'sorting.aliases."{folder}": folder name is 258 bytes long in UTF-8, over the 255 a '
        "file name may have"
    ]


def test_folder_name_with_a_lone_surrogate_is_refused() -> None:
    # TOML cannot spell one (its escapes are Unicode scalar values), so load_config never sees
    # one; the rule is checked directly.
    from daemon.config import _folder_name_problem

    assert _folder_name_problem("Smith\udce9", 64) == (
        "must not contain lone surrogates (not encodable as UTF-8)"
    )


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_config_refuses_exactly_the_device_names_layout_renames(tmp_path: Path, name: str) -> None:
    lowered = name.lower() + ".txt"
    path = write_config(tmp_path, f"[sorting]\nunknown_folder = {toml_string(lowered)}\n")

    assert load_errors(path) == [
        f"sorting.unknown_folder: must not be the Windows device name {name}, in any case or "
        "before an extension"
    ]
    assert physician_folder_name(
        lowered, template="{family}", unknown_folder="unknown", max_length=64
    ) == lowered.replace(".", "_.", 1)


@pytest.mark.parametrize("name", ["COM10", "Conrad", "Connor", "Nully", "LPT", "AUXILIARY"])
def test_names_that_only_resemble_device_names_pass_config_and_layout(
    tmp_path: Path, name: str
) -> None:
    path = write_config(tmp_path, f'[sorting]\nunknown_folder = "{name}"\n')

    assert load_config(path).sorting.unknown_folder == name
    assert physician_folder_name(name, template="{family}", unknown_folder="u", max_length=64) == (
        name
    )


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("{first}", "unknown placeholder {first}"),
        ("{}", "unknown placeholder {}"),
        ("{0}", "unknown placeholder {0}"),
        ("{family.upper}", "unknown placeholder {family.upper}"),
        ("{family[0]}", "unknown placeholder {family[0]}"),
        ("{family:d}", "placeholder {family:d}: conversions and format specs are not supported"),
        ("{family:{given}}", "placeholder {family:{given}}: conversions and format specs"),
        ("{family}}", "is not a valid template"),
        ("plain", "has no placeholder"),
        ("", "must not be empty"),
    ],
)
def test_template_that_str_format_could_not_fill_is_rejected(
    tmp_path: Path, template: str, problem: str
) -> None:
    path = write_config(tmp_path, f"[sorting]\nfolder_template = {toml_string(template)}\n")

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"sorting.folder_template: {problem}")


@pytest.mark.parametrize(
    ("first", "second"),
    [("Smith", "SMITH"), ("Yıldız", "YILDIZ"), ("Müller", "Mu\u0308ller"), ("Straße", "STRASSE")],
)
def test_alias_folders_that_are_one_folder_over_smb_are_rejected(
    tmp_path: Path, first: str, second: str
) -> None:
    assert folder_key(first) == folder_key(second)
    path = write_config(
        tmp_path,
        f'[sorting.aliases]\n"{first}" = ["A^B"]\n"{second}" = ["C^D"]\n',
    )

    assert load_errors(path) == [
        f"sorting.aliases.{toml_key(second)}: same folder as sorting.aliases.{toml_key(first)} "
        "on a case-insensitive share"
    ]


def test_alias_folder_that_is_the_unknown_folder_over_smb_is_rejected(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[sorting]\nunknown_folder = "Yıldız"\n[sorting.aliases]\nYILDIZ = ["Y^A"]\n'
    )

    assert load_errors(path) == [
        'sorting.aliases.YILDIZ: folder name must differ from sorting.unknown_folder ("Yıldız")'
    ]


@pytest.mark.parametrize("spelling", [" ^ ", "^^^^", "  "])
def test_alias_spelling_that_names_no_one_is_rejected(tmp_path: Path, spelling: str) -> None:
    path = write_config(
        tmp_path, f'[sorting.aliases]\nSmith = ["SMITH^JOHN", {toml_string(spelling)}]\n'
    )

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith("sorting.aliases.Smith[1]: ")


def test_smith_j_and_smith_j_with_empty_components_under_two_folders_are_rejected(
    tmp_path: Path,
) -> None:
    # Ingest looks aliases up by person_name_key, which drops empty trailing components.
    path = write_config(
        tmp_path, '[sorting.aliases]\nSmith_J = ["Smith^J"]\nSmith_John = ["SMITH^J^^"]\n'
    )

    assert load_errors(path) == [
        'sorting.aliases.Smith_John[0]: "SMITH^J^^" is already listed under '
        'sorting.aliases.Smith_J as "Smith^J"; a spelling can lead to one folder only'
    ]


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("Smith^J", "SMITH^J^^"),
        (" smith ^ j ", "Smith^J"),
        ("Smith  Jones^A", "smith jones^a"),
        ("Müller^J", "MU\u0308LLER^J"),
        ("Yıldız^A", "YILDIZ^A"),
        ("Smith^J", "Smith^^J"),
        ("SmithJones^A", "Smith Jones^A"),
        ("Smith^J", "Smith^Jo"),
    ],
)
def test_config_alias_rule_agrees_with_the_key_ingest_looks_up(
    tmp_path: Path, first: str, second: str
) -> None:
    path = write_config(
        tmp_path,
        f"[sorting.aliases]\nOne = [{toml_string(first)}]\nTwo = [{toml_string(second)}]\n",
    )
    same_person = person_name_key(first) == person_name_key(second)

    if same_person:
        assert load_errors(path)[0].startswith("sorting.aliases.Two[0]: ")
    else:
        lookup = alias_lookup(load_config(path).sorting.aliases)
        assert lookup == {person_name_key(first): "One", person_name_key(second): "Two"}


SAMPLE_REFERRING_PHYSICIANS = [
    "",
    " ^ ",
    "Smith^John",
    "SMITH^J^^",
    "CON",
    "nul.txt^x",
    "Müller^Jürgen",
    "山田^太郎",
    "😀" * 100,
    "A" * 300 + "^" + "B" * 300,
    "..^..",
    "Smith/Jones^Ann^B^Dr.^Jr.^extra",
    "x\x00\udce9^\u202e",
]


def uncommented_shipped_config() -> str:
    return uncomment_example(SHIPPED_CONFIG.read_text(encoding="utf-8"), "sorting.aliases")


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(None, id="shipped"),
        pytest.param("uncommented", id="shipped-with-alias-examples"),
        pytest.param(
            '[sorting]\nunknown_folder = "n.a.-"\nmax_folder_length = 20\n'
            "[sorting.aliases]\n"
            '"Dr. Smith, J. (Card)" = ["Smith^J", "SMITH^J^^", " smith ^ j "]\n'
            '"Yıldız" = ["Yıldız^Ayşe", "YILDIZ^AYSE"]\n'
            '"山田" = ["山田^太郎", "YAMADA^TAROU"]\n',
            id="aliases-at-the-edges",
        ),
        pytest.param(
            '[sorting]\nfolder_template = "{{{prefix}}} {family}, {given} {middle}.{suffix}"\n'
            'unknown_folder = "Unbekannt…"\nmax_folder_length = 200\n',
            id="template-with-literal-braces",
        ),
        pytest.param(
            '[sorting]\nfolder_template = "{suffix}"\nunknown_folder = "COM10"\n'
            "max_folder_length = 200\n"
            "[sorting.aliases]\n" + toml_string("\U0001f600" * 63) + ' = ["EMOJI^"]\n',
            id="emoji-alias-folder-of-252-bytes",
        ),
    ],
)
def test_every_accepted_sorting_config_works_in_layout(tmp_path: Path, body: str | None) -> None:
    if body is None:
        path = SHIPPED_CONFIG
    else:
        path = tmp_path / "config.toml"
        path.write_text(
            uncommented_shipped_config() if body == "uncommented" else VALID_PATHS + body,
            encoding="utf-8",
        )
    sorting = load_config(path).sorting

    lookup = alias_lookup(sorting.aliases)
    names = [
        physician_folder_name(
            name,
            template=sorting.folder_template,
            unknown_folder=sorting.unknown_folder,
            max_length=sorting.max_folder_length,
        )
        for name in SAMPLE_REFERRING_PHYSICIANS
    ]

    for folder, spellings in sorting.aliases.items():
        assert all(lookup[person_name_key(spelling)] == folder for spelling in spellings)
    assert names[0] == names[1] == sorting.unknown_folder
    assert all(0 < len(name) <= sorting.max_folder_length for name in names)


def test_config_sections_are_hashable_and_immutable(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[sorting.aliases]\nSmith_John = ["SMITH^JOHN"]\n')
    sorting = load_config(path).sorting

    assert hash(sorting) == hash(dataclasses.replace(sorting))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sorting.unknown_folder = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        sorting.aliases["x"] = ("Y",)  # type: ignore[index]


# --- convert ------------------------------------------------------------------------------------


def test_convert_section_absent_gives_every_default(tmp_path: Path) -> None:
    convert = load_config(write_config(tmp_path, "")).convert

    assert convert == ConvertConfig()
    assert convert.enabled is True
    assert convert.engine == "dcm2niix"
    assert convert.schedule == "0 5 * * *"
    assert convert.timezone == ""
    assert convert.settle_minutes == 30.0
    assert convert.workers == 0
    assert convert.timeout_seconds == 3600.0
    assert convert.memory_limit == "4GiB"
    assert convert.memory_limit_bytes == 4 * 1024**3
    assert convert.max_attempts == 3
    assert convert.preview is True
    assert convert.study_template == "{PatientID}_{StudyDate}_{StudyDescription}"
    assert convert.series_template == "{SeriesNumber:03d}_{SeriesDescription}"
    assert convert.dcm2niix is None


def test_every_convert_key_is_read_as_written(tmp_path: Path) -> None:
    program = executable(tmp_path / "tools" / "dcm2niix")
    path = write_config(
        tmp_path,
        '[convert]\nenabled = false\nengine = "Dicom2NIfTI"\nschedule = "*/15 6-20 * * mon-fri"\n'
        'timezone = "Europe/Berlin"\nsettle_minutes = 2.5\nworkers = 4\ntimeout_seconds = 600\n'
        'memory_limit = "512 MiB"\nmax_attempts = 5\npreview = false\n'
        'study_template = "{StudyDate}_{AccessionNumber}"\n'
        'series_template = "{Modality}{SeriesNumber:02d}"\ndcm2niix = "tools/dcm2niix"\n',
    )

    convert = load_config(path).convert

    assert convert == ConvertConfig(
        enabled=False,
        engine="dicom2nifti",
        schedule="*/15 6-20 * * mon-fri",
        timezone="Europe/Berlin",
        settle_minutes=2.5,
        workers=4,
        timeout_seconds=600.0,
        memory_limit="512 MiB",
        max_attempts=5,
        preview=False,
        study_template="{StudyDate}_{AccessionNumber}",
        series_template="{Modality}{SeriesNumber:02d}",
        dcm2niix=program.resolve(),
    )
    assert convert.memory_limit_bytes == 512 * 1024**2
    assert isinstance(convert.timeout_seconds, float)


def test_convert_mistakes_are_all_reported_at_once_in_key_order(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[convert]\nenabled = "yes"\nengine = "dcm2nix"\nschedule = "0 25 * * *"\n'
        'timezone = "Europe/Berln"\nsettle_minutes = -1\nworkers = -1\ntimeout_seconds = 0\n'
        'memory_limit = "4G"\nmax_attempts = 0\npreview = 1\nstudy_template = "{PatientId}"\n'
        'series_template = "{SeriesNumber:03d}/x"\nmax_attempt = 2\n',
    )

    errors = load_errors(path)

    assert [error.partition(":")[0] for error in errors] == [
        "convert.max_attempt",
        "convert.enabled",
        "convert.engine",
        "convert.timezone",
        "convert.schedule",
        "convert.settle_minutes",
        "convert.workers",
        "convert.timeout_seconds",
        "convert.memory_limit",
        "convert.max_attempts",
        "convert.preview",
        "convert.study_template",
        "convert.series_template",
    ]
    assert errors[0] == "convert.max_attempt: unknown key; did you mean max_attempts?"
    assert errors[1] == 'convert.enabled: expected true or false, got "yes"'
    assert errors[2] == (
        'convert.engine: expected one of "dcm2niix", "dicom2nifti", got "dcm2nix"; '
        "did you mean dcm2niix?"
    )
    assert errors[5] == "convert.settle_minutes: expected a number >= 0, got -1"
    assert errors[6] == "convert.workers: expected an integer >= 0, got -1"
    assert errors[7] == "convert.timeout_seconds: expected a number > 0, got 0"
    assert errors[9] == "convert.max_attempts: expected an integer >= 1, got 0"
    assert errors[10] == "convert.preview: expected true or false, got 1"


def test_top_level_convert_key_says_it_belongs_under_convert(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('schedule = "0 5 * * *"\n' + VALID_PATHS, encoding="utf-8")

    assert load_errors(path) == ["schedule: unknown top-level key; it belongs under [convert]"]


def test_memory_limit_bytes_is_derived_and_not_a_key_of_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "[convert]\nmemory_limit_bytes = 1073741824\n")

    assert load_errors(path) == [
        "convert.memory_limit_bytes: unknown key; did you mean memory_limit?"
    ]
    assert dataclasses.replace(ConvertConfig(), memory_limit="1GB").memory_limit_bytes == 10**9


def test_engine_is_case_insensitive_and_stored_lowercase(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[convert]\nengine = "DCM2NIIX"\n')

    assert load_config(path).convert.engine == "dcm2niix"


def test_zero_workers_means_one_per_cpu_core() -> None:
    assert ConvertConfig(workers=0).effective_workers == max(1, os.cpu_count() or 1)
    assert ConvertConfig(workers=3).effective_workers == 3


def test_convert_config_is_hashable_and_immutable() -> None:
    convert = ConvertConfig(memory_limit="unlimited")

    assert hash(convert) == hash(ConvertConfig(memory_limit="unlimited"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        convert.workers = 2  # type: ignore[misc]


# --- convert: sizes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4GiB", 4 * 1024**3),
        ("4 GiB", 4 * 1024**3),
        ("4gib", 4 * 1024**3),
        ("512MiB", 512 * 1024**2),
        ("1KiB", 1024),
        ("2TiB", 2 * 1024**4),
        ("1.5GB", 1_500_000_000),
        ("1.5 gb", 1_500_000_000),
        ("10MB", 10_000_000),
        ("3kb", 3000),
        ("1TB", 10**12),
        ("100B", 100),
        ("1000000", 1_000_000),
        ("0", 0),
        (".5KiB", 512),
        ("1.0009KB", 1000),  # a fraction of a byte is dropped
        (" 8 GiB ", 8 * 1024**3),
        ("unlimited", 0),
        ("Unlimited", 0),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "GiB", "-1GB", "1e9", "1,000", "4 G i B", "four GiB", "1..5KB"]
)
def test_parse_size_of_something_that_is_not_a_size_shows_valid_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size") as raised:
        parse_size(text)

    assert '"4GiB", "512 MiB"' in str(raised.value)
    assert '"unlimited"' in str(raised.value)


@pytest.mark.parametrize(("text", "unit"), [("4G", "G"), ("4 gigs", "gigs"), ("1 KIBI", "KIBI")])
def test_parse_size_with_an_unknown_unit_lists_the_units(text: str, unit: str) -> None:
    with pytest.raises(ValueError, match="unknown unit") as raised:
        parse_size(text)

    assert str(raised.value).startswith(
        f'"{text}": unknown unit "{unit}"; use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, '
        'e.g. "4GiB"'
    )


@pytest.mark.parametrize("limit", ["256MiB", "268435456", "0.25GiB", "unlimited", "1TiB"])
def test_memory_limit_of_at_least_256_mib_or_unlimited_is_accepted(
    tmp_path: Path, limit: str
) -> None:
    path = write_config(tmp_path, f'[convert]\nmemory_limit = "{limit}"\n')

    convert = load_config(path).convert

    assert convert.memory_limit == limit
    assert convert.memory_limit_bytes == (0 if limit == "unlimited" else parse_size(limit))


@pytest.mark.parametrize("limit", ["255MiB", "100MB", "268435455", "0", "0GiB"])
def test_memory_limit_below_256_mib_is_rejected_saying_why(tmp_path: Path, limit: str) -> None:
    path = write_config(tmp_path, f'[convert]\nmemory_limit = "{limit}"\n')

    assert load_errors(path) == [
        f'convert.memory_limit: "{limit}" is below 256 MiB, too little for a conversion process '
        'to start; write at least "256MiB" (4GiB suits most series), or "unlimited"'
    ]


def test_memory_limit_that_is_not_a_size_string_is_reported_with_its_key_path(
    tmp_path: Path,
) -> None:
    as_number = write_config(tmp_path / "a", "[convert]\nmemory_limit = 4096\n")
    no_unit = write_config(tmp_path / "b", '[convert]\nmemory_limit = "4 gigabytes"\n')
    too_big = write_config(tmp_path / "c", '[convert]\nmemory_limit = "9000000TiB"\n')

    assert load_errors(as_number) == [
        'convert.memory_limit: expected a size as a string, e.g. "4GiB", "512 MiB", "1.5GB", '
        '"1000000" (bytes) or "unlimited", got 4096'
    ]
    assert load_errors(no_unit)[0].startswith(
        'convert.memory_limit: "4 gigabytes": unknown unit "gigabytes"'
    )
    assert load_errors(too_big) == [
        'convert.memory_limit: "9000000TiB" is more than any system has; write "unlimited"'
    ]


# --- convert: schedule and time zone ------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "reason"),
    [
        ("0 25 * * *", "the last value (25) is higher than the maximum value (23)"),
        ("60 5 * * *", "the last value (60) is higher than the maximum value (59)"),
        ("0 5 * 13 *", "the last value (13) is higher than the maximum value (12)"),
        ("0 5 * *", "Wrong number of fields; got 4, expected 5"),
        ("0 5 * * * *", "Wrong number of fields; got 6, expected 5"),
        ("@daily", "Wrong number of fields; got 1, expected 5"),
        ("", "Wrong number of fields; got 0, expected 5"),
        ("x 5 * * *", 'Unrecognized expression "x" for field "minute"'),
        ("0 5 * * sun-mon", "The minimum value in a range must not be higher than the maximum"),
    ],
)
def test_schedule_that_is_no_crontab_line_reports_why_and_an_example(
    tmp_path: Path, schedule: str, reason: str
) -> None:
    path = write_config(tmp_path, f'[convert]\nschedule = "{schedule}"\n')

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith(f'convert.schedule: not a valid crontab schedule "{schedule}" (')
    assert reason in errors[0]
    assert errors[0].endswith(
        'write 5 fields, minute hour day month weekday, e.g. "0 5 * * *" (05:00 every day) or '
        '"30 22 * * mon-fri"'
    )


@pytest.mark.parametrize("schedule", ["0 5 * * 1-5", "0 5 * * 0", "0 5 * * 7", "0 5 * * mon,3"])
def test_schedule_with_a_weekday_number_is_rejected_for_a_name(
    tmp_path: Path, schedule: str
) -> None:
    # APScheduler 3 counts weekdays from Monday = 0, crontab from Sunday = 0.
    path = write_config(tmp_path, f'[convert]\nschedule = "{schedule}"\n')

    assert load_errors(path) == [
        f'convert.schedule: write the weekday (5th field) of "{schedule}" by name, mon tue wed thu '
        "fri sat sun (e.g. mon-fri): crontab counts from 0 = Sunday, the scheduler from "
        "0 = Monday"
    ]


def test_schedule_that_never_runs_is_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[convert]\nschedule = "0 5 30 2 *"\n')

    assert load_errors(path) == [
        'convert.schedule: "0 5 30 2 *" never runs (no such date); e.g. "0 5 * * *" (05:00 every '
        'day) or "30 22 * * mon-fri"'
    ]


@pytest.mark.parametrize(
    "schedule",
    [
        "0 5 * * *",
        "*/15 * * * *",
        "30 22 * * mon-fri",
        "0 3 * * sun",
        "0 1 * * */2",
        "0 4 last * *",
    ],
)
def test_accepted_schedule_builds_the_trigger_the_daemon_runs(
    tmp_path: Path, schedule: str
) -> None:
    path = write_config(
        tmp_path, f'[convert]\nschedule = "{schedule}"\ntimezone = "Europe/Berlin"\n'
    )
    convert = load_config(path).convert

    trigger = CronTrigger.from_crontab(convert.schedule, timezone=convert.tzinfo)

    assert convert.schedule == schedule
    assert trigger.get_next_fire_time(None, datetime.now(convert.tzinfo)) is not None


def test_the_default_schedule_runs_at_five_in_the_configured_zone_across_dst(
    tmp_path: Path,
) -> None:
    path = write_config(tmp_path, '[convert]\ntimezone = "Europe/Berlin"\n')
    convert = load_config(path).convert
    trigger = CronTrigger.from_crontab(convert.schedule, timezone=convert.tzinfo)
    berlin = ZoneInfo("Europe/Berlin")

    winter = trigger.get_next_fire_time(None, datetime(2025, 1, 15, 12, tzinfo=berlin))
    summer = trigger.get_next_fire_time(None, datetime(2025, 7, 15, 12, tzinfo=berlin))

    assert convert.tzinfo == berlin
    assert (winter.hour, winter.utcoffset().total_seconds()) == (5, 3600)
    assert (summer.hour, summer.utcoffset().total_seconds()) == (5, 7200)


def test_empty_timezone_is_the_servers_local_zone_with_its_dst_rules(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, "")
    monkeypatch.setenv("TZ", "America/New_York")
    tzlocal.reload_localzone()
    try:
        local = load_config(path).convert.tzinfo
        january = datetime(2025, 1, 15, 12, tzinfo=local).utcoffset()
        july = datetime(2025, 7, 15, 12, tzinfo=local).utcoffset()
    finally:
        monkeypatch.undo()
        tzlocal.reload_localzone()

    assert local == ZoneInfo("America/New_York")
    assert january is not None
    assert july is not None
    assert (january.total_seconds(), july.total_seconds()) == (-5 * 3600, -4 * 3600)


@pytest.mark.parametrize(
    ("timezone", "hint"),
    [
        ("Europe/Berln", "; did you mean Europe/Berlin?"),
        ("europe/berlin", "; did you mean Europe/Berlin?"),
        (" Europe/Berlin", "; did you mean Europe/Berlin?"),
        ("Mars/Olympus_Mons", ""),
        ("../etc/passwd", ""),
        ("/etc/localtime", ""),
    ],
)
def test_unknown_timezone_is_reported_with_an_example(
    tmp_path: Path, timezone: str, hint: str
) -> None:
    path = write_config(tmp_path, f'[convert]\ntimezone = "{timezone}"\n')

    assert load_errors(path) == [
        f'convert.timezone: unknown time zone "{timezone}"; write an IANA name such as '
        f'"Europe/Berlin" or "UTC", or "" for the server\'s local time zone{hint}'
    ]


# --- convert: naming templates ------------------------------------------------------------------


def test_template_field_sets_are_shared_frozensets_and_series_extends_study() -> None:
    assert isinstance(STUDY_TEMPLATE_FIELDS, frozenset)
    assert isinstance(SERIES_TEMPLATE_FIELDS, frozenset)
    added = SERIES_TEMPLATE_FIELDS - STUDY_TEMPLATE_FIELDS
    assert added == {"SeriesNumber", "SeriesDescription", "Modality"}
    assert "PatientID" in STUDY_TEMPLATE_FIELDS


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ("", "must not be empty; use some of {PatientID}, {PatientName}"),
        ("{PatientId}", "unknown field {PatientId}; allowed: {PatientID}"),
        ("{SeriesNumber}", "unknown field {SeriesNumber}; allowed: {PatientID}"),
        ("{}", "placeholder {} has no field name"),
        ("{0}", "placeholder {0} has no field name"),
        ("{PatientName.upper}", "placeholder {PatientName.upper}: attribute and index access"),
        ("{PatientName[0]}", "placeholder {PatientName[0]}: attribute and index access"),
        ("{PatientID!r}", "placeholder {PatientID!r}: conversions (!r, !s, !a) are not supported"),
        ("{StudyDate:{StudyTime}}", "placeholder {StudyDate:{StudyTime}}: a format spec must"),
        ("{StudyDate:03d}", "placeholder {StudyDate:03d}: Unknown format code 'd'"),
        ("{StudyDate:%Y}", "placeholder {StudyDate:%Y}: "),
        ("{PatientID", "is not a valid template"),
        ("{PatientID}}", "is not a valid template"),
        ("study", "has no field, so every study would get the same name"),
        ("{{PatientID}}", "has no field, so every study would get the same name"),
        ("{PatientID}/{StudyDate}", "text outside placeholders must not contain /"),
        ("{PatientID}\t", "must not contain control characters"),
        (".{PatientID}", "must not start with '.'"),
    ],
)
def test_study_template_that_cannot_name_a_folder_is_rejected(
    tmp_path: Path, template: str, problem: str
) -> None:
    path = write_config(tmp_path, f"[convert]\nstudy_template = {toml_string(template)}\n")

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"convert.study_template: {problem}")


def test_template_field_with_the_wrong_case_suggests_the_right_one(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[convert]\nstudy_template = "{patientid}"\nseries_template = "{SeriesNumbr:03d}"\n',
    )

    errors = load_errors(path)

    assert errors[0].endswith("did you mean {PatientID}?")
    assert errors[1].startswith("convert.series_template: unknown field {SeriesNumbr:03d}")
    assert errors[1].endswith("did you mean {SeriesNumber}?")


def test_series_template_problems_are_each_reported(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[convert]\nseries_template = "{SeriesDescription:d}:{Modality!s}_{SeriesNumber:x<}"\n',
    )

    assert load_errors(path) == [
        "convert.series_template: placeholder {SeriesDescription:d}: Unknown format code 'd' for "
        "object of type 'str' (SeriesDescription is text)",
        "convert.series_template: placeholder {Modality!s}: conversions (!r, !s, !a) are not "
        "supported; write {Modality}",
        "convert.series_template: text outside placeholders must not contain :",
    ]


def test_series_template_without_a_field_would_give_every_series_one_name(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[convert]\nseries_template = "series"\n')

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith(
        "convert.series_template: has no field, so every series would get the same name; use "
        "some of {PatientID},"
    )
    assert errors[0].endswith("{SeriesNumber}, {SeriesDescription}, {Modality}")


@pytest.mark.parametrize(
    ("study", "series"),
    [
        ("{PatientName}-{StudyTime}", "{SeriesNumber}"),
        ("{{{StudyID}}}", "{PatientID}_{SeriesNumber:>4}_{Modality:.2}"),
        ("{AccessionNumber:_<12}", "{SeriesNumber:03d}_{SeriesDescription}_{StudyDate}"),
        ("Studie {StudyDescription} ü", "{SeriesNumber:+}"),
    ],
)
def test_templates_with_allowed_fields_and_format_specs_are_accepted(
    tmp_path: Path, study: str, series: str
) -> None:
    path = write_config(
        tmp_path,
        f"[convert]\nstudy_template = {toml_string(study)}\n"
        f"series_template = {toml_string(series)}\n",
    )

    convert = load_config(path).convert

    assert (convert.study_template, convert.series_template) == (study, series)


# --- convert: the dcm2niix program --------------------------------------------------------------


def test_empty_dcm2niix_means_the_one_installed_with_dcmdb(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[convert]\ndcm2niix = ""\n')
    bundled = Path(dcm2niix.bin)

    assert load_config(path).convert.dcm2niix is None
    assert bundled.is_file()
    assert os.access(bundled, os.X_OK)


def test_dcm2niix_path_resolves_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    program = executable(tmp_path / "etc" / "bin" / "dcm2niix")
    path = write_config(tmp_path / "etc", '[convert]\ndcm2niix = "bin/dcm2niix"\n')
    monkeypatch.chdir(tmp_path)

    assert load_config(path).convert.dcm2niix == program.resolve()


def test_dcm2niix_that_is_missing_a_folder_or_not_executable_says_what_to_do(
    tmp_path: Path,
) -> None:
    folder = (tmp_path / "tools").resolve()
    executable(folder / "plain", 0o644)
    (folder / "dir").mkdir()
    missing = write_config(tmp_path / "a", f'[convert]\ndcm2niix = "{folder}/dcm2niix"\n')
    a_folder = write_config(tmp_path / "b", f'[convert]\ndcm2niix = "{folder}/dir"\n')
    not_executable = write_config(tmp_path / "c", f'[convert]\ndcm2niix = "{folder}/plain"\n')
    not_a_string = write_config(tmp_path / "d", "[convert]\ndcm2niix = false\n")

    assert load_errors(missing) == [
        f"convert.dcm2niix: {folder}/dcm2niix: no such file; write the full path of the dcm2niix "
        'program, or "" for the one installed with dcmdb'
    ]
    assert load_errors(a_folder) == [
        f"convert.dcm2niix: {folder}/dir is a folder; name the dcm2niix program inside it, or "
        '"" for the one installed with dcmdb'
    ]
    assert load_errors(not_executable) == [
        f"convert.dcm2niix: {folder}/plain is not executable; make it so (chmod +x "
        f'{folder}/plain), or write "" for the one installed with dcmdb'
    ]
    assert load_errors(not_a_string) == [
        "convert.dcm2niix: expected a path (a non-empty string), got false"
    ]
    assert stat.S_IMODE((folder / "plain").stat().st_mode) == 0o644


def test_bare_dcm2niix_name_points_at_the_program_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_path = executable(tmp_path / "usr" / "bin" / "dcm2niix")
    monkeypatch.setenv("PATH", str(on_path.parent))
    path = write_config(tmp_path / "etc", '[convert]\ndcm2niix = "dcm2niix"\n')

    assert load_errors(path) == [
        f"convert.dcm2niix: {(tmp_path / 'etc').resolve()}/dcm2niix: no such file; write the "
        f'full path of the dcm2niix program (on PATH: {on_path}), or "" for the one installed '
        "with dcmdb"
    ]


# --- retention ----------------------------------------------------------------------------------


def test_retention_section_absent_is_off_with_every_default(tmp_path: Path) -> None:
    retention = load_config(write_config(tmp_path, "")).retention

    assert retention == RetentionConfig()
    assert retention.enabled is False
    assert retention.low_free == ""
    assert retention.target_free == ""
    assert retention.max_archive_size == ""
    assert retention.min_age_days == 30.0
    assert retention.protect == ()
    assert retention.keep_unconverted is True
    assert retention.order == "received"
    assert retention.max_studies_per_run == 100
    assert retention.check_every_minutes == 10.0
    assert retention.low_free_threshold is None
    assert retention.target_free_threshold is None
    assert retention.max_archive_bytes is None


def test_every_retention_key_is_read_as_written(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[retention]\nlow_free = "200GiB"\ntarget_free = "12.5%"\nmax_archive_size = "1.5TB"\n'
        'min_age_days = 7.5\nprotect = ["Smith_John", "unknown"]\nkeep_unconverted = false\n'
        'order = "study_date"\nmax_studies_per_run = 20\ncheck_every_minutes = 1\n',
    )

    retention = load_config(path).retention

    assert retention == RetentionConfig(
        low_free="200GiB",
        target_free="12.5%",
        max_archive_size="1.5TB",
        min_age_days=7.5,
        protect=("Smith_John", "unknown"),
        keep_unconverted=False,
        order="study_date",
        max_studies_per_run=20,
        check_every_minutes=1.0,
    )
    assert retention.enabled is True
    assert retention.low_free_threshold == SpaceThreshold("bytes", 200 * 1024**3)
    assert retention.target_free_threshold == SpaceThreshold("percent", 12.5)
    assert retention.max_archive_bytes == 1_500_000_000_000
    assert isinstance(retention.check_every_minutes, float)


def test_retention_mistakes_are_all_reported_at_once_in_key_order(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[retention]\nlow_free = "ten percent"\ntarget_free = 15\nmax_archive_size = "10%"\n'
        'min_age_days = -1\nprotect = ["Smith_John", 3, "CON"]\nkeep_unconverted = "yes"\n'
        'order = "recieved"\nmax_studies_per_run = 0\ncheck_every_minutes = 0\n'
        "min_age = 30\n",
    )

    errors = load_errors(path)

    assert errors == [
        "retention.min_age: unknown key; did you mean min_age_days?",
        'retention.low_free: "ten percent" is not a percentage or a size; write a number and a '
        'unit or %, e.g. "10%", "12.5%" (of the filesystem), "200GiB" or "500 GB", or "" to turn '
        "retention off",
        'retention.target_free: expected a percentage or a size as a string, e.g. "10%", '
        '"12.5%" (of the filesystem), "200GiB" or "500 GB", got 15',
        'retention.max_archive_size: "10%": write the archive\'s size limit as a size, not a '
        'percentage, e.g. "2TiB", "500 GB" or "1.5TB", or "" for no limit',
        "retention.min_age_days: expected a number >= 0, got -1",
        "retention.protect[1]: expected a folder name (a string), got 3",
        "retention.protect[2]: folder name must not be the Windows device name CON, in any case "
        "or before an extension",
        'retention.keep_unconverted: expected true or false, got "yes"',
        'retention.order: expected one of "received", "study_date", got "recieved"; did you '
        "mean received?",
        "retention.max_studies_per_run: expected an integer >= 1, got 0",
        "retention.check_every_minutes: expected a number > 0, got 0",
    ]


def test_top_level_retention_key_says_it_belongs_under_retention(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('low_free = "10%"\n' + VALID_PATHS, encoding="utf-8")

    assert load_errors(path) == ["low_free: unknown top-level key; it belongs under [retention]"]


def test_low_free_without_target_free_is_refused_for_there_is_no_default(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[retention]\nlow_free = "10%"\n')

    assert load_errors(path) == [
        "retention.target_free: must be set when low_free is: how much free space pruning makes, "
        'e.g. "10%", "12.5%" (of the filesystem), "200GiB" or "500 GB", at least low_free '
        '("10%"); deleting studies cannot be undone, so there is no default'
    ]


def test_target_free_and_max_archive_size_without_low_free_are_refused_as_retention_is_off(
    tmp_path: Path,
) -> None:
    path = write_config(
        tmp_path, '[retention]\nlow_free = ""\ntarget_free = "15%"\nmax_archive_size = "2TiB"\n'
    )

    assert load_errors(path) == [
        "retention.target_free: is set but low_free is not, and retention is off unless low_free "
        'is set; set low_free too (e.g. "10%"), or remove target_free',
        "retention.max_archive_size: is set but low_free is not, and retention is off unless "
        "low_free is set; set low_free and target_free too, or remove max_archive_size",
    ]


def test_invalid_low_free_is_reported_alone_not_as_missing(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[retention]\nlow_free = "10 GB free"\ntarget_free = "1%"\n')

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith('retention.low_free: "10 GB free" is not a percentage or a size')


@pytest.mark.parametrize(
    ("low_free", "target_free"),
    [("10%", "9.99%"), ("200GiB", "199GiB"), ("1TB", "999 GB"), ("50%", "5%")],
)
def test_target_free_below_low_free_of_the_same_kind_is_refused(
    tmp_path: Path, low_free: str, target_free: str
) -> None:
    path = write_config(
        tmp_path, f'[retention]\nlow_free = "{low_free}"\ntarget_free = "{target_free}"\n'
    )

    assert load_errors(path) == [
        f'retention.target_free: "{target_free}" is less than low_free ("{low_free}"); pruning '
        "stops once free space reaches target_free, so it must be at least low_free"
    ]


@pytest.mark.parametrize(
    ("low_free", "target_free"),
    [
        ("10%", "10%"),
        ("10%", "10.5 %"),
        ("200GiB", "200GiB"),
        ("1000GB", "1TB"),
        ("5%", "1GiB"),  # kinds differ: compared against the filesystem's size at run time
        ("900GiB", "1%"),
    ],
)
def test_target_free_at_least_low_free_or_of_another_kind_is_accepted(
    tmp_path: Path, low_free: str, target_free: str
) -> None:
    path = write_config(
        tmp_path, f'[retention]\nlow_free = "{low_free}"\ntarget_free = "{target_free}"\n'
    )

    retention = load_config(path).retention

    assert retention.enabled
    assert retention.low_free_threshold == parse_threshold(low_free)
    assert retention.target_free_threshold == parse_threshold(target_free)


def test_zero_low_free_is_refused_saying_how_to_turn_retention_off(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[retention]\nlow_free = "0 GiB"\ntarget_free = "0"\n')

    assert load_errors(path) == [
        "retention.low_free: must be more than 0 (free space is never below 0, so nothing would "
        'be pruned); write "" or leave low_free out to turn retention off',
        'retention.target_free: must be more than 0, e.g. "10%", "12.5%" (of the filesystem), '
        '"200GiB" or "500 GB"',
    ]


@pytest.mark.parametrize(
    ("low_free", "percent"), [("0%", "0%"), ("100%", "100%"), ("250 %", "250 %")]
)
def test_low_free_percentage_outside_0_to_100_is_refused(
    tmp_path: Path, low_free: str, percent: str
) -> None:
    path = write_config(tmp_path, f'[retention]\nlow_free = "{low_free}"\ntarget_free = "50%"\n')

    assert load_errors(path) == [
        f'retention.low_free: "{percent}": a percentage of the filesystem must be more than 0 '
        'and less than 100, e.g. "10%", "12.5%" (of the filesystem), "200GiB" or "500 GB", or "" '
        "to turn retention off"
    ]


def test_low_free_below_ingest_min_free_is_refused_for_ingest_would_pause_first(
    tmp_path: Path,
) -> None:
    sizes = write_config(tmp_path / "a", '[retention]\nlow_free = "512MiB"\ntarget_free = "2GiB"\n')
    percents = write_config(
        tmp_path / "b",
        '[ingest]\nmin_free = "5%"\n[retention]\nlow_free = "4.5%"\ntarget_free = "10%"\n',
    )

    assert load_errors(sizes) == [
        'retention.low_free: "512MiB" is less than ingest.min_free ("1GiB"): ingest would pause '
        "first and wait for space that pruning never frees; make low_free at least "
        "ingest.min_free"
    ]
    assert load_errors(percents)[0].startswith(
        'retention.low_free: "4.5%" is less than ingest.min_free ("5%")'
    )


@pytest.mark.parametrize(
    ("min_free", "low_free"),
    [("1GiB", "1GiB"), ("1GiB", "1%"), ("10%", "1GiB"), ("0", "1MiB"), ("5%", "5%")],
)
def test_low_free_at_least_ingest_min_free_or_of_another_kind_is_accepted(
    tmp_path: Path, min_free: str, low_free: str
) -> None:
    path = write_config(
        tmp_path,
        f'[ingest]\nmin_free = "{min_free}"\n'
        f'[retention]\nlow_free = "{low_free}"\ntarget_free = "{low_free}"\n',
    )

    config = load_config(path)

    assert config.ingest.min_free == min_free
    assert config.retention.low_free == low_free


def test_invalid_ingest_min_free_is_not_compared_with_low_free(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[ingest]\nmin_free = "lots"\n[retention]\nlow_free = "1MiB"\ntarget_free = "2MiB"\n',
    )

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith('ingest.min_free: "lots" is not a percentage or a size')


@pytest.mark.parametrize(
    ("size", "problem"),
    [
        ('"unlimited"', '"unlimited": write "" for no limit'),
        (
            '"0"',
            '"0" would prune every study it may; write a size more than 0, e.g. "2TiB", "500 GB" '
            'or "1.5TB", or "" for no limit',
        ),
        (
            '"2T"',
            '"2T": unknown unit "T"; use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, e.g. '
            '"2TiB", "500 GB" or "1.5TB", or "" for no limit',
        ),
        (
            "2048",
            'expected a size as a string, e.g. "2TiB", "500 GB" or "1.5TB", or "" for no limit, '
            "got 2048",
        ),
        (
            '"9000000TiB"',
            '"9000000TiB" is more than any filesystem holds; write less, e.g. "2TiB", "500 GB" or '
            '"1.5TB", or "" for no limit',
        ),
    ],
)
def test_max_archive_size_must_be_a_size_more_than_zero(
    tmp_path: Path, size: str, problem: str
) -> None:
    path = write_config(
        tmp_path,
        f'[retention]\nlow_free = "10%"\ntarget_free = "20%"\nmax_archive_size = {size}\n',
    )

    assert load_errors(path) == [f"retention.max_archive_size: {problem}"]


@pytest.mark.parametrize(
    "folder", ["", "..", "a/b", ".hidden", "trailing.", "CON", "aux.x", "x:y", "a\tb", "u" * 65]
)
def test_protected_folder_that_no_client_can_use_is_rejected_with_its_index(
    tmp_path: Path, folder: str
) -> None:
    path = write_config(
        tmp_path, f'[retention]\nprotect = ["Smith_John", {toml_string(folder)}, "unknown"]\n'
    )

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith("retention.protect[1]: folder name ")


def test_protected_folder_may_be_as_long_as_sorting_allows(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, f'[sorting]\nmax_folder_length = 100\n[retention]\nprotect = ["{"x" * 100}"]\n'
    )

    assert load_config(path).retention.protect == ("x" * 100,)


def test_protect_that_is_not_an_array_is_reported(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[retention]\nprotect = "Smith_John"\n')

    assert load_errors(path) == [
        'retention.protect: expected an array of physician folder names (["Smith_John", ...]), '
        'got "Smith_John"'
    ]


def test_protected_folders_compare_ignoring_case_as_on_the_share() -> None:
    retention = RetentionConfig(protect=["Smith_John", "Müller"])  # type: ignore[arg-type]

    assert retention.protect == ("Smith_John", "Müller")
    assert retention.is_protected("Smith_John")
    assert retention.is_protected("SMITH_JOHN")
    assert retention.is_protected("mÜller")
    assert not retention.is_protected("Smith_Jane")
    assert not RetentionConfig().is_protected("unknown")


def test_order_is_case_insensitive_and_stored_lowercase(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[retention]\norder = "Study_Date"\n')

    assert load_config(path).retention.order == "study_date"


def test_retention_keys_may_be_tuned_while_retention_is_off(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[retention]\nlow_free = ""\nmin_age_days = 90\nprotect = ["Smith_John"]\n'
    )

    retention = load_config(path).retention

    assert not retention.enabled
    assert retention.min_age_days == 90.0


def test_threshold_fields_are_derived_and_not_keys_of_the_file(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[ingest]\nmin_free_threshold = "1GiB"\n[retention]\nmax_archive_bytes = 1000\n',
    )

    assert load_errors(path) == [
        "ingest.min_free_threshold: unknown key; did you mean min_free?",
        "retention.max_archive_bytes: unknown key; did you mean max_archive_size?",
    ]


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"low_free": "10%"}, "retention.target_free: must be set when low_free is"),
        ({"target_free": "10%"}, "retention.target_free: is set but low_free is not"),
        ({"max_archive_size": "1TB"}, "retention.max_archive_size: is set but low_free is not"),
        ({"low_free": "10%", "target_free": "5%"}, 'retention.target_free: "5%" is less than'),
        (
            {"low_free": "10%", "target_free": "15%", "max_archive_size": "unlimited"},
            'write "" for no limit',
        ),
        ({"low_free": "lots", "target_free": "15%"}, "is not a percentage or a size"),
    ],
)
def test_retention_config_that_the_file_would_refuse_cannot_be_built(
    fields: dict[str, str], problem: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        RetentionConfig(**fields)  # type: ignore[arg-type]


def test_retention_config_is_hashable_and_immutable() -> None:
    retention = RetentionConfig(low_free="10%", target_free="20%", protect=("A",))

    assert hash(retention) == hash(dataclasses.replace(retention))
    with pytest.raises(dataclasses.FrozenInstanceError):
        retention.low_free = "5%"  # type: ignore[misc]


# --- metrics ------------------------------------------------------------------------------------


def test_metrics_section_absent_is_off_on_loopback(tmp_path: Path) -> None:
    metrics = load_config(write_config(tmp_path, "")).metrics

    assert metrics == MetricsConfig()
    assert metrics.enabled is False
    assert metrics.address == "127.0.0.1"
    assert metrics.port == 9723


def test_every_metrics_key_is_read_as_written(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[metrics]\nenabled = true\naddress = "::1"\nport = 9100\n')

    assert load_config(path).metrics == MetricsConfig(enabled=True, address="::1", port=9100)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "10.1.2.3", "0.0.0.0", "::"])
def test_metrics_address_may_be_any_ip_address(tmp_path: Path, address: str) -> None:
    # Loopback is the advice (config.toml says why), not a rule: a dedicated monitoring
    # interface, or every interface behind a firewall, is the admin's call.
    path = write_config(tmp_path, f"[metrics]\naddress = {toml_string(address)}\n")

    assert load_config(path).metrics.address == address


@pytest.mark.parametrize("address", ["localhost", "metrics.example.org", "127.0.0.1:9723", ""])
def test_metrics_address_that_is_not_an_ip_address_is_refused(tmp_path: Path, address: str) -> None:
    path = write_config(tmp_path, f"[metrics]\naddress = {toml_string(address)}\n")

    assert load_errors(path) == [
        'metrics.address: expected an IP address such as "127.0.0.1" (loopback, the safe '
        f'choice) or "::1", got {toml_string(address)}; a host name is not accepted'
    ]


def test_metrics_mistakes_are_all_reported_at_once_in_key_order(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, '[metrics]\nenabled = "yes"\naddress = 127\nport = 0\nadress = "::1"\n'
    )

    assert load_errors(path) == [
        "metrics.adress: unknown key; did you mean address?",
        'metrics.enabled: expected true or false, got "yes"',
        "metrics.address: expected a string, got 127",
        "metrics.port: expected an integer from 1 to 65535, got 0",
    ]


@pytest.mark.parametrize("port", ["65536", "-1", "9723.0", "true", '"9723"'])
def test_metrics_port_outside_1_to_65535_or_not_an_integer_is_refused(
    tmp_path: Path, port: str
) -> None:
    path = write_config(tmp_path, f"[metrics]\nport = {port}\n")

    [error] = load_errors(path)

    assert error.startswith("metrics.port: expected an integer from 1 to 65535, got ")


def test_top_level_metrics_key_says_it_belongs_under_metrics(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("port = 9100\n" + VALID_PATHS, encoding="utf-8")

    assert load_errors(path) == ["port: unknown top-level key; it belongs under [metrics]"]


def test_metrics_config_is_hashable_and_immutable() -> None:
    metrics = MetricsConfig(enabled=True, port=9100)

    assert hash(metrics) == hash(MetricsConfig(enabled=True, port=9100))
    with pytest.raises(dataclasses.FrozenInstanceError):
        metrics.port = 1  # type: ignore[misc]


# --- free-space thresholds ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "threshold"),
    [
        ("10%", SpaceThreshold("percent", 10.0)),
        ("12.5 %", SpaceThreshold("percent", 12.5)),
        (" .5% ", SpaceThreshold("percent", 0.5)),
        ("99.9%", SpaceThreshold("percent", 99.9)),
        ("200GiB", SpaceThreshold("bytes", 200 * 1024**3)),
        ("500 GB", SpaceThreshold("bytes", 500 * 10**9)),
        ("1.5tb", SpaceThreshold("bytes", 1_500_000_000_000)),
        ("1000000", SpaceThreshold("bytes", 1_000_000)),
        ("0", SpaceThreshold("bytes", 0)),
    ],
)
def test_parse_threshold_reads_percentages_and_sizes(text: str, threshold: SpaceThreshold) -> None:
    assert parse_threshold(text) == threshold


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", '"" is not a percentage or a size; write a number and a unit or %'),
        ("lots", '"lots" is not a percentage or a size; write a number and a unit or %'),
        ("-5%", '"-5%" is not a percentage; write a number and %'),
        ("%", '"%" is not a percentage; write a number and %'),
        ("10%%", '"10%%" is not a percentage; write a number and %'),
        ("0%", '"0%": a percentage of the filesystem must be more than 0 and less than 100'),
        ("100%", '"100%": a percentage of the filesystem must be more than 0 and less than 100'),
        ("unlimited", '"unlimited" is no amount of free space; write a percentage or a size'),
        ("5G", '"5G": unknown unit "G"; use % or one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB'),
        ("9000000TiB", '"9000000TiB" is more than any filesystem holds'),
    ],
)
def test_parse_threshold_of_something_else_says_what_and_shows_examples(
    text: str, problem: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as raised:
        parse_threshold(text)

    assert str(raised.value).startswith(problem)
    assert str(raised.value).endswith(
        'e.g. "10%", "12.5%" (of the filesystem), "200GiB" or "500 GB"'
    )


def test_percentage_threshold_in_bytes_is_rounded_up_from_the_decimal_written() -> None:
    assert parse_threshold("10%").bytes_of(1000) == 100
    assert parse_threshold("10%").bytes_of(1001) == 101  # 100.1 bytes
    # 12.3 as a binary float is a little more than 12.3, which would round 123 up to 124.
    assert parse_threshold("12.3%").bytes_of(1000) == 123
    assert parse_threshold("50%").bytes_of(0) == 0
    assert parse_threshold("5%").bytes_of(16 * 1024**4) == -(-16 * 1024**4 // 20)


@pytest.mark.parametrize("text", ["10%", "12.3%", "33.3%", "0.1%", "99.99%"])
def test_free_below_a_percentage_threshold_is_exactly_free_below_that_percentage(
    text: str,
) -> None:
    threshold = parse_threshold(text)
    percent = Fraction(text.removesuffix("%"))
    for total in (999, 1000, 4096, 10**12 + 7):
        limit = threshold.bytes_of(total)
        for free in (limit - 1, limit):
            assert (free < limit) == (free * 100 < percent * total)


def test_size_threshold_in_bytes_does_not_depend_on_the_filesystem() -> None:
    threshold = parse_threshold("1GiB")

    assert threshold.bytes_of(0) == threshold.bytes_of(10**15) == 1024**3
    assert isinstance(threshold.bytes_of(10**15), int)


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("percent", 0),
        ("percent", 100),
        ("percent", math.nan),
        ("bytes", -1),
        ("bytes", 1.5),
        ("kb", 1),
    ],
)
def test_space_threshold_refuses_values_parse_threshold_would_not_give(
    kind: str, value: float
) -> None:
    with pytest.raises(ValueError, match=r"must be|kind must be"):
        SpaceThreshold(kind, value)  # type: ignore[arg-type]


# --- ingest: free space -------------------------------------------------------------------------


def test_ingest_pauses_below_one_gib_free_by_default(tmp_path: Path) -> None:
    ingest = load_config(write_config(tmp_path, "")).ingest

    assert ingest.min_free == "1GiB"
    assert ingest.min_free_threshold == SpaceThreshold("bytes", 1024**3)
    assert ingest.min_free_threshold.bytes_of(10**12) == 1024**3


@pytest.mark.parametrize(
    ("min_free", "bytes_of_a_terabyte"),
    [("2%", 2 * 10**10), ("500 MB", 500 * 10**6), ("0", 0)],
)
def test_ingest_min_free_is_a_percentage_or_a_size_and_zero_never_pauses(
    tmp_path: Path, min_free: str, bytes_of_a_terabyte: int
) -> None:
    path = write_config(tmp_path, f'[ingest]\nmin_free = "{min_free}"\n')

    ingest = load_config(path).ingest

    assert ingest.min_free == min_free
    assert ingest.min_free_threshold.bytes_of(10**12) == bytes_of_a_terabyte


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('""', 'must not be empty; write e.g. "10%"'),
        ("1024", "expected a percentage or a size as a string"),
        ('"unlimited"', '"unlimited" is no amount of free space'),
        ('"0%"', '"0%": a percentage of the filesystem must be more than 0 and less than 100'),
    ],
)
def test_ingest_min_free_mistakes_say_how_never_to_pause(
    tmp_path: Path, value: str, problem: str
) -> None:
    path = write_config(tmp_path, f"[ingest]\nmin_free = {value}\n")

    errors = load_errors(path)

    assert len(errors) == 1
    assert errors[0].startswith(f"ingest.min_free: {problem}")
    assert ', or "0" never to pause' in errors[0]


# --- finding the file ---------------------------------------------------------------------------


def test_explicit_config_wins_over_environment_and_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    explicit = write_config(tmp_path / "explicit", "")
    from_env = write_config(tmp_path / "env", "")
    write_config(tmp_path / "cwd", "")
    monkeypatch.chdir(tmp_path / "cwd")

    found = find_config_file(str(explicit), {"DCMDB_CONFIG": str(from_env)})

    assert found == explicit


def test_environment_config_wins_over_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from_env = write_config(tmp_path / "env", "")
    write_config(tmp_path / "cwd", "")
    monkeypatch.chdir(tmp_path / "cwd")

    assert find_config_file(None, {"DCMDB_CONFIG": str(from_env)}) == from_env


def test_cwd_config_is_used_when_nothing_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_cwd = write_config(tmp_path / "cwd", "")
    system = write_config(tmp_path / "etc", "")
    monkeypatch.chdir(tmp_path / "cwd")

    found = find_config_file(None, {"DCMDB_CONFIG": ""}, system_config=system)

    assert found == in_cwd
    assert found.is_absolute()


def test_system_config_is_used_when_the_cwd_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = write_config(tmp_path / "etc", "")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")

    assert find_config_file(None, {}, system_config=system) == system


def test_named_config_that_does_not_exist_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_config(tmp_path, "")  # would be found in the cwd, but a named file must not fall through
    monkeypatch.chdir(tmp_path)
    missing = str(tmp_path / "missing.toml")

    with pytest.raises(ConfigError) as explicit:
        find_config_file(missing, {})
    with pytest.raises(ConfigError) as from_env:
        find_config_file(None, {"DCMDB_CONFIG": missing})

    assert str(explicit.value) == f"--config {missing}: no such file"
    assert str(from_env.value) == f"DCMDB_CONFIG {missing}: no such file"


def test_no_config_anywhere_is_an_error_listing_every_path_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    system = tmp_path / "etc" / "dcmdb" / "config.toml"

    with pytest.raises(ConfigError) as raised:
        find_config_file(None, {}, system_config=system)

    message = str(raised.value)
    assert str(tmp_path / "empty" / "config.toml") in message
    assert str(system) in message
    assert "--config" in message
    assert "DCMDB_CONFIG" in message


def test_default_system_config_is_in_etc_dcmdb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if Path("/etc/dcmdb/config.toml").exists():
        pytest.skip("/etc/dcmdb/config.toml exists on this machine, so it would be found")
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")

    with pytest.raises(ConfigError) as raised:
        find_config_file(None, {})

    assert "/etc/dcmdb/config.toml" in str(raised.value)


# --- rendering ----------------------------------------------------------------------------------


def test_render_config_round_trips_a_config_with_every_key_changed(tmp_path: Path) -> None:
    path = write_config(
        tmp_path / "conf",
        '[paths]\nincoming = "/srv/in"\narchive = "/srv/archive"\n'
        'quarantine = "q \\"quoted\\" \\\\ dir"\nstate = "~/state"\n'
        '[ingest]\nobserver = "polling"\npolling_interval_seconds = 0.5\nsettle_seconds = 0\n'
        "incomplete_timeout_seconds = 1e3\nrescan_seconds = 5\nempty_folder_grace_seconds = 0\n"
        'parse_workers = 3\nbatch_size = 10000\nmin_free = "5%"\n'
        '[sorting]\nfolder_template = "Dr {family} {given}"\nunknown_folder = "Niemand"\n'
        "max_folder_length = 200\n"
        '[sorting.aliases]\nSmith_John = ["SMITH^JOHN", "SMITH^J"]\n"Müller Ä.B" = ["MÜLLER^Ä"]\n'
        '[logging]\nlevel = "WARNING"\nformat = "json"\n'
        '[convert]\nenabled = false\nengine = "dicom2nifti"\nschedule = "30 22 * * mon-fri"\n'
        'timezone = "Europe/Berlin"\nsettle_minutes = 0\nworkers = 2\ntimeout_seconds = 90.5\n'
        'memory_limit = "1.5 GB"\nmax_attempts = 1\npreview = false\n'
        'study_template = "{{{PatientName}}} {AccessionNumber}"\n'
        'series_template = "{Modality}-{SeriesNumber:>4}"\ndcm2niix = "bin/dcm2niix"\n'
        '[retention]\nlow_free = "7.5 %"\ntarget_free = "300GiB"\nmax_archive_size = "20 TiB"\n'
        'min_age_days = 0\nprotect = ["Smith_John", "Dr. M. Müller"]\n'
        'keep_unconverted = false\norder = "Study_Date"\nmax_studies_per_run = 1\n'
        "check_every_minutes = 0.5\nrequire_pacs_copy = true\n"
        '[metrics]\nenabled = true\naddress = "fe80::1"\nport = 1\n'
        '[listener]\nenabled = true\nae_title = "LAB"\naddress = "::"\nport = 4242\n'
        'allowed_ae_titles = ["MRI"]\nallowed_addresses = ["10.0.0.0/8"]\n'
        '[retrieve]\nenabled = true\npacs_host = "pacs"\npacs_port = 11112\n'
        'pacs_ae_title = "PACS"\nae_title = "LAB2"\nmethod = "get"\n'
        'schedule = "15 3 * * sun"\ntimezone = "UTC"\nlookback_days = 7\n'
        'modalities = ["MR"]\nstudy_description = "*head*"\nreferring_physician = "X*"\n'
        "timeout_seconds = 5\n",
        with_paths=False,
    )
    executable(tmp_path / "conf" / "bin" / "dcm2niix")
    config = load_config(path)
    assert config.ingest != IngestConfig()
    assert config.sorting != SortingConfig()
    assert all(
        getattr(config.convert, item.name) != getattr(ConvertConfig(), item.name)
        for item in dataclasses.fields(ConvertConfig)
    )
    assert all(
        getattr(config.retention, item.name) != getattr(RetentionConfig(), item.name)
        for item in dataclasses.fields(RetentionConfig)
    )
    assert all(
        getattr(config.metrics, item.name) != getattr(MetricsConfig(), item.name)
        for item in dataclasses.fields(MetricsConfig)
    )
    for section, cls in ((config.listener, ListenerConfig), (config.retrieve, RetrieveConfig)):
        assert all(
            getattr(section, item.name) != getattr(cls(), item.name)
            for item in dataclasses.fields(cls)
        )
    assert config.ingest.min_free_threshold == SpaceThreshold("percent", 5.0)
    rendered = tmp_path / "rendered.toml"
    rendered.write_text(render_config(config), encoding="utf-8")

    reloaded = load_config(rendered)

    assert reloaded.source == rendered
    assert reloaded == dataclasses.replace(config, source=rendered)


def test_render_config_fills_in_every_default(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, ""))

    document = tomllib.loads(render_config(config))

    assert document["paths"]["archive"] == str(tmp_path.resolve() / "var" / "archive")
    assert document["ingest"] == {
        item.name: getattr(IngestConfig(), item.name)
        for item in dataclasses.fields(IngestConfig)
        if item.init
    }
    assert document["ingest"]["min_free"] == "1GiB"
    assert document["logging"] == dataclasses.asdict(LoggingConfig())
    assert document["sorting"] == {
        "folder_template": "{family}_{given}",
        "unknown_folder": "unknown",
        "max_folder_length": 64,
        "aliases": {},
    }
    assert document["convert"] == {
        "enabled": True,
        "engine": "dcm2niix",
        "schedule": "0 5 * * *",
        "timezone": "",
        "settle_minutes": 30.0,
        "workers": 0,
        "timeout_seconds": 3600.0,
        "memory_limit": "4GiB",
        "max_attempts": 3,
        "preview": True,
        "study_template": "{PatientID}_{StudyDate}_{StudyDescription}",
        "series_template": "{SeriesNumber:03d}_{SeriesDescription}",
        "dcm2niix": "",
    }
    assert document["retention"] == {
        "low_free": "",
        "target_free": "",
        "max_archive_size": "",
        "min_age_days": 30.0,
        "protect": [],
        "keep_unconverted": True,
        "order": "received",
        "max_studies_per_run": 100,
        "check_every_minutes": 10.0,
        "require_pacs_copy": False,
    }
    assert document["metrics"] == {"enabled": False, "address": "127.0.0.1", "port": 9723}


# --- listener, retrieve, require_pacs_copy --------------------------------------------------


def test_listener_and_retrieve_are_off_by_default(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, ""))

    assert config.listener == ListenerConfig()
    assert not config.listener.enabled
    assert config.retrieve == RetrieveConfig()
    assert not config.retrieve.enabled
    assert config.retrieve.schedule == "0 1 * * *"
    assert config.retrieve.lookback_days == 2
    assert config.retention.require_pacs_copy is False


def test_every_listener_and_retrieve_key_is_read_as_written(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[listener]\nenabled = true\nae_title = "LAB"\naddress = "127.0.0.1"\n'
        'port = 4242\nallowed_ae_titles = ["MRI", "PACS "]\n'
        'allowed_addresses = ["10.1.4.0/24"]\n'
        '[retrieve]\nenabled = true\npacs_host = "pacs.example.org"\npacs_port = 11112\n'
        'pacs_ae_title = "PACS"\nae_title = "LAB"\nmethod = "GET"\n'
        'schedule = "30 2 * * mon-fri"\ntimezone = "UTC"\nlookback_days = 5\n'
        'modalities = ["mr", "CT"]\nstudy_description = "*brain*"\n'
        'referring_physician = "smith^*"\ntimeout_seconds = 10\n',
    )

    config = load_config(path)

    assert config.listener == ListenerConfig(
        enabled=True,
        ae_title="LAB",
        address="127.0.0.1",
        port=4242,
        allowed_ae_titles=("MRI", "PACS"),
        allowed_addresses=("10.1.4.0/24",),
    )
    assert config.retrieve == RetrieveConfig(
        enabled=True,
        pacs_host="pacs.example.org",
        pacs_port=11112,
        pacs_ae_title="PACS",
        ae_title="LAB",
        method="get",
        schedule="30 2 * * mon-fri",
        timezone="UTC",
        lookback_days=5,
        modalities=("MR", "CT"),
        study_description="*brain*",
        referring_physician="smith^*",
        timeout_seconds=10.0,
    )


def test_network_mistakes_are_all_reported_at_once_with_their_keys(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[listener]\nenabled = true\nae_title = "A_TITLE_LONGER_THAN_16"\nport = 0\n'
        'allowed_addresses = ["scanner.local"]\n'
        '[retrieve]\nenabled = true\nmethod = "push"\nlookback_days = 0\n'
        'modalities = ["M R!"]\n'
        "[retention]\nrequire_pacs_copy = true\n",
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    errors = caught.value.errors
    assert any(e.startswith("listener.ae_title: AE title") and "at most 16" in e for e in errors)
    assert any(e.startswith("listener.port: expected an integer from 1 to 65535") for e in errors)
    assert any(e.startswith("listener.allowed_addresses[0]: expected an IP") for e in errors)
    assert any(e.startswith("listener.allowed_ae_titles: must list") for e in errors)
    assert any(e.startswith("retrieve.method: expected one of") for e in errors)
    assert any(e.startswith("retrieve.lookback_days: expected an integer >= 1") for e in errors)
    assert any(e.startswith("retrieve.modalities[0]: expected a modality") for e in errors)
    assert any(e.startswith("retrieve.pacs_host: must be set") for e in errors)
    assert any(e.startswith("retrieve.pacs_ae_title: must be set") for e in errors)
    assert any(e.startswith("retention.require_pacs_copy: needs the PACS") for e in errors)


def test_retrieve_by_move_needs_the_listener(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[retrieve]\nenabled = true\npacs_host = "pacs"\npacs_ae_title = "PACS"\n',
    )

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    (error,) = caught.value.errors
    assert error.startswith('retrieve.method: "move" has the PACS send the studies to our listener')
    assert 'method = "get"' in error


def test_rendered_network_sections_load_back_equal(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[listener]\nenabled = true\nallowed_ae_titles = ["PACS"]\n'
        '[retrieve]\nenabled = true\npacs_host = "pacs"\npacs_ae_title = "PACS"\n'
        'modalities = ["MR"]\n[retention]\nrequire_pacs_copy = false\n',
    )
    config = load_config(path)
    rendered = tmp_path / "rendered" / "config.toml"
    rendered.parent.mkdir()
    rendered.write_text(render_config(config), encoding="utf-8")

    again = load_config(rendered)

    assert (again.listener, again.retrieve) == (config.listener, config.retrieve)
