"""Every command names the same setting the same way (issue: one settings model, one face).

The option table of every command is read from click itself, so a new command or option is
checked as soon as it exists."""

from __future__ import annotations

import click

from oc_engine.cli import main

# Spellings that name one setting; only the first may appear (in any command).
SYNONYMS = {
    "tokens to generate": ("--max-new-tokens", "--new-tokens", "--max-tokens", "--tokens-to-generate"),
    "requests decoded together": ("--max-num-seqs", "--slots", "--num-slots", "--concurrent-requests"),
    "where the result goes": ("--out", "--output", "--output-dir", "--out-dir"),
    "which model": ("--model", "--model-path", "--checkpoint-model"),
    "which probe": ("--probe", "--probe-dir"),
    "which second stage": ("--classifier", "--classifier-dir"),
    "seed": ("--seed", "--random-seed"),
    "machine-readable output": ("--json", "--as-json"),
}
def commands(group: click.Group = main, prefix: str = ""):
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            yield from commands(command, path + " ")
        else:
            yield path, command


def options(command: click.Command):
    for param in command.params:
        if isinstance(param, click.Option):
            yield param, [flag for flag in param.opts + param.secondary_opts if flag.startswith("--")]


def test_no_setting_has_two_names():
    seen = {flag: [] for group in SYNONYMS.values() for flag in group}
    for path, command in commands():
        for _, flags in options(command):
            for flag in flags:
                if flag in seen:
                    seen[flag].append(path)
    wrong = {flag: where for group in SYNONYMS.values() for flag in group[1:] for where in [seen[flag]] if where}
    assert not wrong, f"use the canonical spelling: {wrong}"


def test_no_output_is_a_positional_argument():
    positional = [(path, p.name) for path, command in commands() for p in command.params
                  if isinstance(p, click.Argument) and p.name in ("out", "output", "dest", "target")]
    assert not positional, f"outputs are --out: {positional}"


def test_every_command_takes_verbose():
    missing = [path for path, command in commands() if not any(f == ["--verbose"] for _, f in options(command))]
    assert not missing
