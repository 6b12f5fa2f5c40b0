"""One exception type for every user-facing failure.

The CLI turns an `OcEngineError` into a one-line message and a non-zero exit; the
library raises it for bad input (paths, files, thresholds, prompts) so that callers
can tell user errors from bugs.
"""


class OcEngineError(Exception):
    """A problem with the user's input or environment, explained in one line."""
