"""Secret flags of the CLI: --X-file, $FAASMOE_X, and --X with a warning (faasmoe/cli/credentials.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from faasmoe.cli import build_parser, credentials
from faasmoe.cli.credentials import resolve_secret


@pytest.fixture(autouse=True)
def fresh_warning(monkeypatch):
    monkeypatch.setattr(credentials, "_warned", False)
    monkeypatch.delenv("FAASMOE_TOKEN", raising=False)


@pytest.mark.parametrize("argv", [["scheduler"], ["serve", "m"], ["frontend", "m", "--scheduler", "h:1"],
                                  ["worker", "join", "h:1"]])
def test_every_command_with_a_token_reads_it_from_a_file(argv, tmp_path: Path, capsys, monkeypatch) -> None:
    secret = tmp_path / "token"
    secret.write_text("tok-from-file\nignored second line\n")
    args = build_parser().parse_args([*argv, "--token-file", str(secret)])
    assert resolve_secret(args, "token", "FAASMOE_TOKEN") == "tok-from-file"
    monkeypatch.setenv("FAASMOE_TOKEN", "tok-from-env")
    args = build_parser().parse_args(argv)
    assert resolve_secret(args, "token", "FAASMOE_TOKEN") == "tok-from-env"
    assert capsys.readouterr().err == ""  # no warning for a file or the environment


def test_a_secret_on_argv_warns_once(capsys) -> None:
    args = build_parser().parse_args(["serve", "m", "--api-key", "k1", "--token", "t1", "--admin-key", "a1"])
    assert [resolve_secret(args, flag, env) for flag, env in (
        ("api-key", "FAASMOE_API_KEY"), ("token", "FAASMOE_TOKEN"), ("admin-key", "FAASMOE_ADMIN_KEY"))] == \
        ["k1", "t1", "a1"]
    err = capsys.readouterr().err
    assert err.count("puts a secret on the command line") == 1 and "--api-key-file" in err


def test_bad_secret_files_are_clear_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for argv, message in ((["--token-file", str(empty)], "empty"), (["--token-file", str(tmp_path / "none")],
                                                                      "cannot read"),
                          (["--token", "t", "--token-file", str(empty)], "not both")):
        args = build_parser().parse_args(["scheduler", *argv])
        with pytest.raises(ValueError, match=message):
            resolve_secret(args, "token", "FAASMOE_TOKEN")
