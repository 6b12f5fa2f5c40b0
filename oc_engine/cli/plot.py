"""`oc-engine plot-trace`: draw a `generate --trace` file."""

from __future__ import annotations

import click

from oc_engine.cli.common import PLOT_SUFFIXES, check_output_file, user_errors


@click.command("plot-trace")
@click.argument("trace_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", default="risk.png", show_default=True, help="Image to write (.png, .pdf or .svg).")
@click.option("--sequence", type=int, default=0, show_default=True, help="Which sequence of the trace to draw.")
@user_errors
def plot_trace(trace_file, out, sequence):
    """Draw a --trace file: per-token score, EMA, thresholds, pause points and verdicts."""
    from oc_engine.plots import plot_trace as draw

    check_output_file(out, "--out", PLOT_SUFFIXES)
    draw(trace_file, out, sequence=sequence)
    click.echo(out)
