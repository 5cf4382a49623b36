"""Fixtures and hooks: a local Ray shared by the session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One local single-node Ray for the whole session, as `pipeline evaluate` starts it."""
    import ray

    from pipeline.runtime import init_ray

    init_ray(None)
    yield
    ray.shutdown()
