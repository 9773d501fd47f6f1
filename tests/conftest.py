"""Shared fixtures: the bundled tiny model loaded once per session."""

import pytest


@pytest.fixture(scope="session")
def tiny_pipeline():
    from pipeline.inprocess import Pipeline

    return Pipeline()


@pytest.fixture(scope="session")
def imgs():
    from tests.helpers import images

    return images()
