"""Fixtures and hooks: a local Ray shared by the session, and the markers that keep the fast subset
(`-m "not ray and not subprocess"`) free of process starts.

A test that starts Ray in this process must be marked `ray` (tests using `ray_local` are marked
for it); one that starts any other program must be marked `subprocess`. Every process a test starts
is seen through Python's audit hook for `subprocess.Popen`, and a test that starts one its markers do
not declare fails. Ray is started once per session, so a test that only joins a running Ray is caught
when it runs without the others: in the fast subset, or alone.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import sys
from pathlib import Path

import pytest

# Ray's own processes (gcs_server, raylet, its Python monitors) run programs of the ray package;
# a `ray start` runs the `ray` command
RAY_PACKAGE = str(Path(importlib.util.find_spec("ray").origin).parent)

# argv of every process started since the current test's setup began
started_processes: list[list[str]] = []


def record_process(event: str, args: tuple) -> None:
    """Audit hook: note the argv of each `subprocess.Popen` (called for every audit event: kept cheap)."""
    if event == "subprocess.Popen":
        argv = args[1]
        started_processes.append([os.fsdecode(argv)] if isinstance(argv, (str, bytes, os.PathLike))
                                 else [os.fsdecode(arg) for arg in argv])


def is_ray_process(argv: list[str]) -> bool:
    return Path(argv[0]).name == "ray" or any(arg.startswith(RAY_PACKAGE) for arg in argv[:3])


def undeclared_processes(item: pytest.Item, processes: list[list[str]]) -> list[str]:
    """What ITEM started that its markers do not declare, one sentence each."""
    problems = []
    ray_starts = [argv for argv in processes if is_ray_process(argv)]
    others = [argv for argv in processes if not is_ray_process(argv)]
    if ray_starts and item.get_closest_marker("ray") is None:
        problems.append(f"it starts Ray ({Path(ray_starts[0][0]).name}) but is not marked `ray`")
    if others and item.get_closest_marker("subprocess") is None:
        command = " ".join(shlex.join(others[0]).split())  # on one line: a `python -c` script has several
        problems.append(f"it runs `{command[:100]}` but is not marked `subprocess`")
    return problems


def pytest_configure(config: pytest.Config) -> None:
    sys.addaudithook(record_process)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `ray` the tests that use the session's Ray, before `-m` selects (hence tryfirst)."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    started_processes.clear()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """After a test passes: fail it if it started a process its markers do not declare (its fixtures'
    processes included: they start during its setup)."""
    result = yield
    problems = undeclared_processes(item, started_processes)
    if problems:
        pytest.fail("; ".join(problems) + " (see tests/conftest.py)", pytrace=False)
    return result


@pytest.fixture(scope="session")
def ray_local():
    """One local single-node Ray for the whole session, as `pipeline evaluate` starts it."""
    import ray

    from pipeline.runtime import init_ray

    init_ray(None)
    yield
    ray.shutdown()
