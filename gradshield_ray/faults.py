"""Test-only fault injection for the Ray pipeline, read from the DRIVER's environment and handed to the
stages as a plain `faults` dict (not a runtime_env, which would need fresh worker processes). Empty in
production: every hook below is a no-op unless its variable is set."""
from __future__ import annotations

import os
import time

FAIL_AFTER_ENV = "GRADSHIELD_TEST_FAIL_AFTER_PARTS"  # the writer raises once this many parts exist
LOAD_LOG_ENV = "GRADSHIELD_TEST_LOAD_LOG"  # scorer actors append a line per model load to this file
KILL_ACTOR_ENV = "GRADSHIELD_TEST_KILL_ACTOR_AFTER"  # "N:FLAG": an actor os._exit()s before call N+1, once
SLOW_ENV = "GRADSHIELD_TEST_SLOW_S"  # sleep per chunk scored and per part written, to widen kill windows
TEST_ENVS = (FAIL_AFTER_ENV, LOAD_LOG_ENV, KILL_ACTOR_ENV, SLOW_ENV)
Faults = dict[str, str]


def from_env() -> Faults:
    """The test hooks set in this (the driver's) environment."""
    return {k: os.environ[k] for k in TEST_ENVS if os.environ.get(k)}


def slow(faults: Faults | None) -> None:
    """Sleep GRADSHIELD_TEST_SLOW_S seconds, if set."""
    if faults and faults.get(SLOW_ENV):
        time.sleep(float(faults[SLOW_ENV]))


def log_load(faults: Faults | None, line: str) -> None:
    """Append one line per model load to GRADSHIELD_TEST_LOAD_LOG, if set."""
    if faults and faults.get(LOAD_LOG_ENV):
        with open(faults[LOAD_LOG_ENV], "a") as f:
            f.write(f"{line}\n")


def maybe_kill_actor(faults: Faults | None, calls: int) -> None:
    """Exit this process hard (no cleanup, like an OOM kill or a lost node) before call N+1, once per flag
    file (spec "N:FLAG"), so Ray must replace the actor and retry the batch."""
    spec = (faults or {}).get(KILL_ACTOR_ENV)
    if not spec:
        return
    n, _, flag = spec.partition(":")
    if calls > int(n):
        try:
            os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os._exit(1)


def maybe_fail(faults: Faults | None, count_parts) -> None:
    """Raise once count_parts() (parts written so far) reaches GRADSHIELD_TEST_FAIL_AFTER_PARTS: a crash
    mid pass 1."""
    if faults and faults.get(FAIL_AFTER_ENV):
        n = count_parts()
        if n >= int(faults[FAIL_AFTER_ENV]):
            raise RuntimeError(f"injected failure after {n} parts")
