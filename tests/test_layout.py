"""Tests for daemon.layout: physician folder names, name keys, aliases and File IDs.

What the admin writes (template, unknown_folder, aliases) is refused by daemon.config, not here:
those rejections are tested in test_config.py.
"""

from __future__ import annotations

import base64
import hashlib
import random
import unicodedata

import pytest

from daemon.layout import (
    FILE_ID_COMPONENT,
    alias_lookup,
    file_id_component,
    folder_key,
    physician_folder_name,
)
from daemon.model import person_name_key

TEMPLATE = "{family}_{given}"
UNKNOWN = "unknown"
MAX_LENGTH = 64

# What a folder name must never contain: illegal for Windows SMB clients, or '/' and NUL (POSIX).
FORBIDDEN_CHARS = set('/\\:*?"<>|')
# Unicode categories that must not survive: controls, format, surrogates, private use,
# unassigned, line and paragraph separators.
FORBIDDEN_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
DEVICE_NAMES = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{port}{digit}" for port in ("COM", "LPT") for digit in "0123456789¹²³"
}


def folder_name(
    name: str,
    template: str = TEMPLATE,
    max_length: int = MAX_LENGTH,
    unknown_folder: str = UNKNOWN,
) -> str:
    return physician_folder_name(
        name, template=template, unknown_folder=unknown_folder, max_length=max_length
    )


def utf8_length(text: str) -> int:
    return len(text.encode("utf-8"))


def assert_safe_folder_name(name: str, max_length: int) -> None:
    """Every rule a physician folder name must satisfy, checked independently of layout.py."""
    assert name, "empty folder name"
    assert not FORBIDDEN_CHARS & set(name), name
    assert not {unicodedata.category(char) for char in name} & FORBIDDEN_CATEGORIES, ascii(name)
    assert ".." not in name
    assert not name.startswith((".", " ")), name
    assert not name.endswith((".", " ")), name
    assert len(name) <= max_length
    assert utf8_length(name) <= 255
    assert unicodedata.is_normalized("NFC", name)
    assert name.partition(".")[0].rstrip(" ").upper() not in DEVICE_NAMES, name


# person_name_key (daemon.model) and folder_key


def test_three_spellings_of_one_physician_share_one_key() -> None:
    spellings = ["SMITH^JOHN", "Smith^John", " smith^john^^ "]

    assert {person_name_key(spelling) for spelling in spellings} == {"smith^john"}


def test_folder_names_of_the_three_spellings_share_one_folder_key() -> None:
    spellings = ["SMITH^JOHN", "Smith^John", " smith^john^^ "]
    names = [folder_name(spelling) for spelling in spellings]

    assert names == ["SMITH_JOHN", "Smith_John", "smith_john"]
    assert len({folder_key(name) for name in names}) == 1


def test_person_name_key_strips_each_component_and_keeps_inner_empty_ones() -> None:
    assert person_name_key(" Smith ^ John ^^Dr. ") == "smith^john^^dr."
    assert person_name_key("^John") == "^john"


def test_person_name_key_of_empty_or_blank_name_is_empty() -> None:
    assert person_name_key("") == ""
    assert person_name_key("  ^ ^^ ") == ""


def test_person_name_key_treats_composed_and_decomposed_umlauts_alike() -> None:
    assert person_name_key("Müller^Jürgen") == person_name_key("MU\u0308LLER^JU\u0308RGEN")


def test_person_name_key_treats_turkish_dotless_i_like_smb_does() -> None:
    # Samba and NTFS upper-case both 'ı' and 'i' to 'I', so these are one folder over SMB.
    assert person_name_key("Yıldız^Ayşe") == person_name_key("YILDIZ^AYŞE")
    assert folder_key("Yıldız_Ayşe") == folder_key("YILDIZ_AYŞE") == folder_key("Yildiz_Ayşe")


def test_folder_key_differs_for_different_names() -> None:
    assert folder_key("Smith_John") != folder_key("Smith_Joan")


def test_folder_key_ignores_case_and_normalization() -> None:
    assert folder_key("Straße") == folder_key("STRASSE")
    assert folder_key("Mu\u0308ller") == folder_key("MÜLLER")


# physician_folder_name: the examples


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Smith/Jones^Ann", "Smith_Jones_Ann"),
        ("..^x", "x"),
        ("A<b>:c|d?^e*", "A_b_c_d_e"),
        ("SMITH^JOHN", "SMITH_JOHN"),
        ("Smith", "Smith"),
        ("Smith^^Paul", "Smith"),
        ("van der Berg^Anna", "van der Berg_Anna"),
        ("Smith \\ Jones^Ann", "Smith_Jones_Ann"),
        ("O'Brien^Seán", "O'Brien_Seán"),
        ("St..John^x", "St.John_x"),
    ],
)
def test_folder_name_of_example_names(name: str, expected: str) -> None:
    assert folder_name(name) == expected


def test_separator_left_by_an_empty_given_name_is_removed() -> None:
    assert folder_name("Smith^") == "Smith"
    assert folder_name("Smith^ ^Paul", template="{family}_{given}_{middle}") == "Smith_Paul"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("山田^太郎", "山田_太郎"),
        ("Müller^Jürgen", "Müller_Jürgen"),
        ("Иванов^Иван", "Иванов_Иван"),
    ],
)
def test_letters_of_any_script_are_kept(name: str, expected: str) -> None:
    assert folder_name(name) == expected


def test_decomposed_umlauts_come_out_composed() -> None:
    name = folder_name("Mu\u0308ller^Ju\u0308rgen")

    assert name == "Müller_Jürgen"
    assert unicodedata.is_normalized("NFC", name)


def test_ideographic_and_no_break_spaces_become_plain_spaces() -> None:
    assert folder_name("山田\u3000花子^x", template="{family}") == "山田 花子"
    assert folder_name("de\u00a0la Cruz^Ana") == "de la Cruz_Ana"


@pytest.mark.parametrize("name", ["", "   ", "^^^^", " ^ ^ ", "..^..", "?*^<>", "\x00\x01^\t"])
def test_empty_blank_or_entirely_unsafe_names_go_to_the_unknown_folder(name: str) -> None:
    assert folder_name(name) == UNKNOWN


def test_template_with_prefix_family_and_given() -> None:
    template = "{prefix} {family}_{given}"

    assert folder_name("Smith^John^^Dr.", template=template) == "Dr. Smith_John"
    assert folder_name("Smith^John", template=template) == "Smith_John"


def test_template_can_abbreviate_a_component_with_a_format_spec() -> None:
    assert folder_name("Smith^John", template="{family}_{given:.1}") == "Smith_J"


def test_template_with_only_the_given_name_sends_a_family_only_name_to_unknown() -> None:
    assert folder_name("Smith", template="{given}") == UNKNOWN


def test_components_beyond_the_fifth_are_appended_to_the_suffix() -> None:
    assert folder_name("A^B^C^D^E^F^G", template="{suffix}") == "E F G"


def test_template_cannot_create_a_subdirectory() -> None:
    assert folder_name("Smith^John", template="{family}/{given}") == "Smith_John"


@pytest.mark.parametrize("unknown_folder", ["_unknown", "No referrer", "n.a.-", "Unbekannt…"])
def test_unknown_folder_chosen_by_the_admin_is_used_as_written(unknown_folder: str) -> None:
    assert folder_name(" ^ ", unknown_folder=unknown_folder) == unknown_folder


def test_max_length_below_one_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_length"):
        folder_name("Smith^John", max_length=0)


# physician_folder_name: safety rules


@pytest.mark.parametrize("char", sorted(FORBIDDEN_CHARS))
def test_each_windows_illegal_character_becomes_an_underscore(char: str) -> None:
    assert folder_name(f"Smith{char}Jones^Ann") == "Smith_Jones_Ann"


def test_control_characters_become_underscores_and_are_collapsed() -> None:
    name = folder_name("Smith\x00\x1f\x7fJones\x85^\tAnn\n")

    assert name == "Smith_Jones_Ann"
    assert_safe_folder_name(name, MAX_LENGTH)


def test_invisible_format_characters_are_dropped() -> None:
    # U+202E would make "Smith_John" display reversed; U+200B and U+FEFF are invisible.
    assert folder_name("Smi\u200bth\ufeff^\u202eJohn") == "Smith_John"


def test_lone_surrogate_from_a_bad_decode_does_not_break_utf8_encoding() -> None:
    name = folder_name("Smith\udce9^John")

    assert name == "Smith_John"
    assert utf8_length(name) == 10


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("CON", "CON_"),
        ("con", "con_"),
        ("Prn", "Prn_"),
        ("aux", "aux_"),
        ("NUL", "NUL_"),
        ("COM1", "COM1_"),
        ("com9", "com9_"),
        ("LPT1", "LPT1_"),
        ("lpt9", "lpt9_"),
        ("COM¹", "COM¹_"),
        ("CONOUT$", "CONOUT$_"),
        ("con.txt", "con_.txt"),
        ("NUL.tar.gz", "NUL_.tar.gz"),
        ("nul .txt", "nul_.txt"),
        ("CON.", "CON_"),
    ],
)
def test_windows_device_names_get_an_underscore_after_the_device_part(
    family: str, expected: str
) -> None:
    assert folder_name(family, template="{family}") == expected


@pytest.mark.parametrize("family", ["COM10", "Conrad", "Connor", "Nully", "LPT", "AUXILIARY"])
def test_names_that_only_resemble_device_names_are_unchanged(family: str) -> None:
    assert folder_name(family, template="{family}") == family


def test_device_name_that_cannot_grow_loses_its_last_character_instead() -> None:
    assert folder_name("CON", template="{family}", max_length=3, unknown_folder="unk") == "CO"
    assert folder_name("Conrad", template="{family}", max_length=3, unknown_folder="unk") == "Co"


@pytest.mark.parametrize("name", [".hidden^x", ".tmp-abc^x", ". .tmp-x", "-rf^x", "x^y. . ."])
def test_no_leading_dot_tmp_prefix_or_dash_and_no_trailing_dot(name: str) -> None:
    result = folder_name(name)

    assert not result.startswith((".", "-"))
    assert not result.endswith((".", " "))
    assert_safe_folder_name(result, MAX_LENGTH)


def test_three_hundred_character_name_is_cut_to_max_length() -> None:
    name = folder_name("A" * 300 + "^" + "B" * 10)

    assert name == "A" * MAX_LENGTH


def test_three_hundred_character_name_is_cut_to_255_bytes_when_max_length_is_larger() -> None:
    name = folder_name("A" * 300, max_length=1000)

    assert name == "A" * 255


def test_long_multibyte_name_is_bounded_in_characters_and_bytes() -> None:
    by_bytes = folder_name("山" * 200 + "^" + "田" * 200, max_length=1000)
    by_chars = folder_name("山" * 200 + "^" + "田" * 200, max_length=20)
    emoji = folder_name("😀" * 100, max_length=1000)

    assert by_bytes == "山" * 85  # 85 x 3 bytes = 255
    assert by_chars == "山" * 20
    assert emoji == "😀" * 63  # 63 x 4 bytes = 252; a 64th would need 256
    assert utf8_length(by_bytes) <= 255
    assert utf8_length(emoji) <= 255


def test_cut_never_separates_a_letter_from_its_combining_mark() -> None:
    # q + U+0301 has no precomposed form, so NFC keeps the pair as two characters.
    by_bytes = folder_name("x" + "q\u0301" * 200, max_length=1000)
    by_chars = folder_name("q\u0301" * 10, max_length=5, unknown_folder="unk")

    assert by_bytes == "x" + "q\u0301" * 84
    assert by_chars == "q\u0301" * 2


def test_cut_that_ends_on_a_separator_is_stripped_again() -> None:
    assert folder_name("Smith^John", max_length=6, unknown_folder="unk") == "Smith"


def test_folder_name_is_a_fixed_point_of_itself() -> None:
    for name in ["Smith/Jones^Ann", "con.txt", "山田^太郎", "A" * 300]:
        once = folder_name(name)

        assert folder_name(once, template="{family}") == once


def test_random_garbage_always_gives_a_safe_bounded_name() -> None:
    rng = random.Random(20240521)
    pools = [
        "abcXYZ019 _-.,;'~",
        "".join(sorted(FORBIDDEN_CHARS)) + ".^ ",
        "".join(map(chr, range(0x20))) + "\x7f\x85\x9f",
        "\u0300\u0301\u0308\u20dd",  # combining marks
        "山田太郎花子",
        "Müllerßçøİıſ",
        "😀🏥👩\u200d⚕",  # 4-byte characters and a ZWJ sequence
        "\u200b\u200e\u202e\ufeff\u00ad",  # format characters
        "\u00a0\u3000\u2028\u2029",  # spaces and separators
        "\ud800\udfff\ue000\ufffe\uffff\ufdd0\U0010ffff",  # surrogates, private, noncharacters
    ]
    templates = [
        TEMPLATE,
        "{prefix} {family}_{given}",
        "{given} {family}",
        "{family}.{given}.{middle}",
        "{family}-{middle}-{suffix}",
        "{family}",
    ]
    device_names = sorted(DEVICE_NAMES)
    for _ in range(4000):
        kind = rng.random()
        if kind < 0.7:
            pool = "".join(rng.sample(pools, rng.randint(1, 4)))
            text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 200)))
        elif kind < 0.9:
            text = "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(rng.randint(0, 300)))
        else:
            text = rng.choice(device_names).lower() + rng.choice(["", ".", " .x", ".tar", "^"])
        max_length = rng.choice([1, 2, 3, 8, 64, 255, 1000])
        unknown_folder = UNKNOWN if max_length >= len(UNKNOWN) else "u"
        template = rng.choice(templates)

        result = folder_name(text, template, max_length, unknown_folder)

        assert_safe_folder_name(result, max_length)
        again = folder_name(result, "{family}", max_length, unknown_folder)
        assert again == result, ascii(text)


# alias_lookup


def test_aliases_map_several_spellings_to_one_folder() -> None:
    lookup = alias_lookup(
        {
            "Smith_John": ["SMITH^JOHN", "Smith^John ", " smith ^ john^^", "Smith^J"],
            "Müller": ["Müller^Jürgen", "MUELLER^JUERGEN"],
        }
    )

    assert lookup[person_name_key("smith^john")] == "Smith_John"
    assert lookup[person_name_key("Smith^J")] == "Smith_John"
    assert lookup[person_name_key("MÜLLER^JÜRGEN")] == "Müller"
    assert lookup[person_name_key("Mueller^Juergen")] == "Müller"
    assert len(lookup) == 4


def test_empty_aliases_give_an_empty_lookup() -> None:
    assert alias_lookup({}) == {}


def test_alias_spelling_repeated_under_one_folder_is_accepted() -> None:
    assert alias_lookup({"Smith": ["Smith^John", "SMITH^JOHN"]}) == {"smith^john": "Smith"}


def test_alias_folder_is_kept_as_the_admin_wrote_it() -> None:
    folder = "Dr. Smith, J. (Cardiology)"

    assert alias_lookup({folder: ["Smith^John"]}) == {"smith^john": folder}


# file_id_component


def test_file_id_component_is_eight_valid_characters() -> None:
    for uid in ["1.2.3", "", "1.2.840.10008.5.1.4.1.1.4", "山田", "x" * 1000]:
        for attempt in range(3):
            component = file_id_component(uid, attempt)

            assert FILE_ID_COMPONENT.fullmatch(component)
            assert len(component) == 8


def test_file_id_component_is_stable_across_calls_and_releases() -> None:
    # Archive paths are derived from these: a change would orphan every existing File ID.
    assert file_id_component("1.2.840.10008.1.2") == "OZYIMYKI"
    assert file_id_component("1.2.840.10008.1.2", 1) == "NDTZ6WOG"
    assert file_id_component("1.2.840.10008.1.2") == file_id_component("1.2.840.10008.1.2", 0)


def test_file_id_component_is_base32_of_sha256_with_attempt_suffix() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"

    def expected(text: str) -> str:
        return base64.b32encode(hashlib.sha256(text.encode()).digest())[:8].decode()

    assert file_id_component(uid) == expected(uid)
    assert file_id_component(uid, 2) == expected(f"{uid}/2")


def test_file_id_component_differs_across_attempts() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1"

    assert len({file_id_component(uid, attempt) for attempt in range(20)}) == 20


def test_file_id_component_has_no_collision_among_ten_thousand_uids() -> None:
    count = 10_000
    rng = random.Random(7)
    uids = [f"1.2.826.0.1.3680043.8.498.{i}" for i in range(count // 2)]
    uids += [f"2.25.{rng.getrandbits(128)}" for _ in range(count - len(uids))]
    # 40 bits per component: the birthday bound gives n(n-1)/2 / 2**40 expected colliding
    # pairs, about 4.5e-5 for 10k UIDs; so a collision here means the hash is broken, not luck.
    # (The attempt counter resolves the rare real one.)
    expected_pairs = count * (count - 1) / 2 / 2**40
    assert expected_pairs < 1e-4

    components = {file_id_component(uid) for uid in uids}

    assert len(set(uids)) == count
    assert len(components) == count


def test_file_id_component_rejects_a_negative_attempt() -> None:
    with pytest.raises(ValueError, match="attempt"):
        file_id_component("1.2.3", -1)
