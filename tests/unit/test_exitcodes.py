"""One exit-code table (``unionfs.exitcodes``): the CLI's ``--help``, the client and the README
say what it says."""

from __future__ import annotations

from pathlib import Path

from unionfs import cli, client, exitcodes
from unionfs.exitcodes import ExitCode

README = Path(__file__).resolve().parents[2] / "README.md"


def test_codes_are_the_documented_numbers() -> None:
    assert [(code.name, int(code)) for code in ExitCode] == [
        ("SUCCESS", 0), ("FAILURE", 1), ("USAGE", 2), ("LAYER", 3),
        ("MOUNTPOINT", 4), ("PERMISSION", 5), ("FUSE", 6), ("STORE", 7),
    ]  # fmt: skip
    assert all(code.meaning for code in ExitCode)


def test_readme_table_is_the_module_table() -> None:
    assert exitcodes.markdown_table() in README.read_text()


def test_help_epilog_lists_every_code() -> None:
    assert exitcodes.help_text() == cli.EXIT_CODES
    for code in ExitCode:
        assert f"  {int(code)}  {code.meaning}\n" in cli.EXIT_CODES


def test_the_client_copy_is_equal() -> None:
    # The client cannot import enum (start-up cost); its own constant must not drift.
    assert client.EXIT_FAILURE == ExitCode.FAILURE
