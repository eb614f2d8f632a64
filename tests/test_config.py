"""Tests for daemon.config: real config files in tmp_path, loaded the way the daemon loads them."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
from pathlib import Path

import pytest

from daemon.config import (
    EX_CONFIG,
    ConfigError,
    IngestConfig,
    LoggingConfig,
    PathsConfig,
    SortingConfig,
    find_config_file,
    load_config,
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

    for section in (IngestConfig, SortingConfig, LoggingConfig, PathsConfig):
        name = section.__name__.removesuffix("Config").lower()
        assert set(document[name]) == {field.name for field in dataclasses.fields(section)}
    assert config.ingest == IngestConfig()
    assert config.sorting == SortingConfig()
    assert config.logging == LoggingConfig()


def test_shipped_alias_example_loads_once_uncommented(tmp_path: Path) -> None:
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    example = re.compile(r"^# (\S.* = \[.*\])$", re.MULTILINE)
    assert len(example.findall(text)) >= 1
    path = tmp_path / "config.toml"
    path.write_text(example.sub(r"\1", text), encoding="utf-8")

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
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    return re.sub(r"^# (\S.* = \[.*\])$", r"\1", text, flags=re.MULTILINE)


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
        "parse_workers = 3\nbatch_size = 10000\n"
        '[sorting]\nfolder_template = "Dr {family} {given}"\nunknown_folder = "Niemand"\n'
        "max_folder_length = 200\n"
        '[sorting.aliases]\nSmith_John = ["SMITH^JOHN", "SMITH^J"]\n"Müller Ä.B" = ["MÜLLER^Ä"]\n'
        '[logging]\nlevel = "WARNING"\nformat = "json"\n',
        with_paths=False,
    )
    config = load_config(path)
    assert config.ingest != IngestConfig()
    assert config.sorting != SortingConfig()
    rendered = tmp_path / "rendered.toml"
    rendered.write_text(render_config(config), encoding="utf-8")

    reloaded = load_config(rendered)

    assert reloaded.source == rendered
    assert reloaded == dataclasses.replace(config, source=rendered)


def test_render_config_fills_in_every_default(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, ""))

    document = tomllib.loads(render_config(config))

    assert document["paths"]["archive"] == str(tmp_path.resolve() / "var" / "archive")
    assert document["ingest"] == dataclasses.asdict(IngestConfig())
    assert document["logging"] == dataclasses.asdict(LoggingConfig())
    assert document["sorting"] == {
        "folder_template": "{family}_{given}",
        "unknown_folder": "unknown",
        "max_folder_length": 64,
        "aliases": {},
    }
