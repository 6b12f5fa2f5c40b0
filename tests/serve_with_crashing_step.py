"""`oc-engine serve` whose engine step raises once a request with max_tokens=77 is running: a
fault injected from outside the package, to test what a dead engine does to a real server."""

from oc_engine.cli import main
from oc_engine.llm import LLM

CRASH_MAX_TOKENS = 77
_step = LLM.step


def step(self):
    if any(seq.params.max_tokens == CRASH_MAX_TOKENS for seq in self.engine.requests.values()):
        raise RuntimeError("injected: the step failed")
    return _step(self)


if __name__ == "__main__":
    LLM.step = step
    main()
