"""Shared fixtures: the bundled tiny model loaded once per session."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def tiny_pipeline():
    from pipeline.inprocess import Pipeline

    return Pipeline()


@pytest.fixture(scope="session")
def imgs():
    from helpers import images

    return images()
