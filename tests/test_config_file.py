"""`--config FILE`: the file's settings reach the library, flags given on the command line
override them, and paths in it are relative to it. (Bad files: tests/test_bad_input_matrix.py.)"""

from __future__ import annotations

import json

from click.testing import CliRunner

from oc_engine.cli import main
from oc_engine.cli.config_file import read_config_file


def _generate(args):
    result = CliRunner().invoke(main, ["generate", "--prompt", "w5 w6", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[-1])


def test_the_file_configures_generate_and_flags_override_it(tiny_model_dir, tmp_path):
    root = tiny_model_dir(20.0)  # a probe that always pauses: no classifier, so every answer is blocked
    config = tmp_path / "oc-engine.toml"
    config.write_text(f"model = '{root / 'model'}'\n"
                      "[engine]\ndtype = 'float32'\ncompile = false\nmax_model_len = 64\n"
                      "[guard]\nprobe = 'probe'\n"  # relative: to the file, not to the working directory
                      "[sampling]\nmax_tokens = 5\nignore_eos = true\n")
    (tmp_path / "probe").symlink_to(root / "probe")
    from oc_engine.config import EngineConfig

    assert read_config_file(config)["probe_dir"] == str(tmp_path / "probe")
    guarded = _generate(["--config", str(config)])
    assert guarded["status"] == "blocked" and guarded["dtype"] == "float32" and guarded["compiled"] is False
    unguarded = _generate(["--config", str(config), "--no-guard", "--max-new-tokens", "3"])
    assert "status" not in unguarded and unguarded["generated_tokens"] == 3
    assert EngineConfig().compile is True  # the file changed this run's options, not the library's defaults


def test_the_file_and_the_flags_name_the_same_settings():
    """Every key the file takes lands on an option of the command that uses it."""
    import click

    from oc_engine.cli.config_file import INVERTED, RENAMED, _sections

    commands = {name: main.commands[name] for name in ("generate", "serve", "eval")}
    names = {p.name for command in commands.values() for p in command.params if isinstance(p, click.Option)}
    for section, (keys, _) in _sections().items():
        for key in keys:
            option = INVERTED.get((section, key)) or RENAMED.get((section, key)) or key
            assert option in names, f"[{section}] {key} has no option"


def test_a_guard_flag_overrides_the_files_opposite(tiny_model_dir, tmp_path):
    root = tiny_model_dir(20.0)
    off = tmp_path / "off.toml"
    off.write_text(f"model = '{root / 'model'}'\n[engine]\ndtype = 'float32'\ncompile = false\n"
                   "[guard]\nenabled = false\n[sampling]\nmax_tokens = 4\n")
    assert "status" not in _generate(["--config", str(off)])
    assert _generate(["--config", str(off), "--probe", str(root / "probe")])["status"] == "blocked"
    result = CliRunner().invoke(main, ["generate", "--model", str(root / "model"), "--prompt", "w5", "--no-guard",
                                       "--probe", str(root / "probe")])
    assert result.exit_code == 1 and "--no-guard excludes --probe" in result.output  # both flags: still an error


def test_a_command_takes_only_its_sections_but_the_file_is_checked_whole(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[sampling]\nseed = 3\nmax_tokens = 5\n[server]\nport = 8100\n")
    assert read_config_file(config, ("engine", "guard", "policy")) == {}  # eval's --seed samples rows: not this
    assert read_config_file(config)["seed"] == 3
    config.write_text("[sampling]\nseed = 3\n[server]\nport = 0\n")
    import pytest

    from oc_engine.errors import OcEngineError

    with pytest.raises(OcEngineError, match=r"\[server\] port must be"):
        read_config_file(config, ("sampling",))
