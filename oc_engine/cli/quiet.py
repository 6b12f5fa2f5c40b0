"""A quiet command line: only oc-engine's own notices and progress bars reach stderr.

Third-party libraries talk on a first run: transformers' load reports ("classifier.bias |
MISSING ... Consider training on your downstream task") and progress bars, torch's exporter
warnings about torchvision and axis names, deprecation warnings. None of it is for the user of
a command; `--verbose` (on every command) lets all of it through, for debugging.

Set before the libraries are imported (their own settings read the environment then), and
through their APIs when a caller in the same process (a test) imported them already.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

# The loggers of the libraries a command loads; oc-engine's own loggers (oc_engine.*, uvicorn's
# access log) are left alone.
THIRD_PARTY_LOGGERS = ("transformers", "torch", "huggingface_hub", "onnxscript", "onnx_ir", "onnxruntime",
                       "accelerate", "peft", "datasets", "filelock", "urllib3", "httpx")
QUIET_ENVIRONMENT = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                     "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TORCH_CPP_LOG_LEVEL": "ERROR",
                     "TORCH_LOGS": "-torch"}  # torch sets its loggers' levels from TORCH_LOGS on import


def set_verbosity(verbose: bool) -> None:
    """Quiet the third-party libraries (the default), or let them talk (`--verbose`)."""
    if verbose:
        for name in QUIET_ENVIRONMENT:
            if os.environ.get(name) == QUIET_ENVIRONMENT[name]:
                del os.environ[name]
        warnings.resetwarnings()
        level = logging.NOTSET
    else:
        for name, value in QUIET_ENVIRONMENT.items():
            os.environ.setdefault(name, value)
        warnings.simplefilter("ignore")
        level = logging.ERROR
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(level)
    if "transformers" in sys.modules:  # imported already: its settings were read from the environment then
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.INFO if verbose else logging.ERROR)
        (hf_logging.enable_progress_bar if verbose else hf_logging.disable_progress_bar)()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        (enable_progress_bars if verbose else disable_progress_bars)()


def verbose_option() -> click.Option:
    """`--verbose`, added to every command: it takes effect as it is parsed, before any work."""
    return click.Option(["--verbose"], is_flag=True, expose_value=False, is_eager=True,
                        callback=lambda ctx, param, value: set_verbosity(value),
                        help="Also show the libraries' own output (load reports, progress bars, warnings); "
                             "without it only oc-engine's lines reach stderr.")


def add_verbose_option(command: click.Command) -> None:
    """Give `command` (and, for a group, each of its commands) the `--verbose` option."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            add_verbose_option(sub)
        return
    command.params.append(verbose_option())
