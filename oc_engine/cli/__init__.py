"""The `oc-engine` command line: a group of thin commands (one module per family here), each of
which only parses options, calls the library and prints."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="oc-engine")
def main():
    """Guarded generation for open-weight LLMs.

    \b
    Quick start (the embedded SmolLM2-135M-Instruct; nothing to download):
      oc-engine generate --prompt "Explain SQL injection at a high level"
      oc-engine generate --prompts-file prompts.jsonl --json
      oc-engine serve                    # OpenAI-compatible server on 127.0.0.1:8000
      oc-engine bench decode
    Every command takes --verbose: the libraries' own output (load reports, warnings) too.
    """
    # Only oc-engine's own lines reach stderr; each command's --verbose lets the libraries talk.


def _register() -> None:
    from oc_engine.cli.bench import bench
    from oc_engine.cli.classifier import calibrate_classifier, export_classifier, train_classifier
    from oc_engine.cli.generate import generate
    from oc_engine.cli.guard import calibrate_guard
    from oc_engine.cli.plot import plot_trace
    from oc_engine.cli.quiet import add_verbose_option
    from oc_engine.cli.probe import (collect, eval_command, headroom_command, revalidate_probe, sweep_layers,
                                         train_probe)
    from oc_engine.cli.reader import train_reader
    from oc_engine.cli.serve import serve

    for command in (generate, serve, bench, plot_trace, export_classifier, train_classifier, calibrate_classifier,
                    collect, train_probe, train_reader, revalidate_probe, sweep_layers, calibrate_guard, eval_command,
                    headroom_command):
        main.add_command(command)
    add_verbose_option(main)


_register()
