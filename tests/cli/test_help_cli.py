"""Every command, option and argument says what it is for; `engine --version`."""

from __future__ import annotations

import click
import typer.main

from engine import __version__
from engine.cli import app


def _commands(cmd: click.Command, path: str = "engine") -> list[tuple[str, click.Command]]:
    found = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            found += _commands(sub, f"{path} {name}")
    return found


def test_every_option_and_argument_has_help() -> None:
    missing = []
    for path, cmd in _commands(typer.main.get_command(app)):
        if not (cmd.help or "").strip():
            missing.append(path)
        for param in cmd.params:
            if not (getattr(param, "help", None) or "").strip():
                missing.append(f"{path} {param.name}")
    assert missing == []


def test_version(cli) -> None:
    assert cli("--version").stdout.strip() == f"engine {__version__}"


def test_replay_help_says_what_the_default_does(cli) -> None:
    text = cli.flat(cli("messages", "replay", "--help").stdout)
    assert "default: only queue its dead deliveries again" in text
