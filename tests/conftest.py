"""Shared fixtures: the bundled tiny model loaded once per session; the session's end leaves nothing running."""

import faulthandler
import gc
import sys
import threading

import pytest


@pytest.fixture(scope="session", autouse=True)
def clean_exit():
    """Torn down last: whatever still runs at the session's end is ended here, while every library is loaded, rather
    than during interpreter shutdown (a run once died of SIGSEGV, exit 139, after every test passed): Ray and Serve's
    driver-side router loop if a folder left them up, engines' step threads, then a collection so native objects
    (engines, compiled grammars, models) are freed now. Threads still alive after that are named in the summary."""
    yield
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            from deployments import localrun

            localrun.stop()
    for thread in threading.enumerate():
        # An AsyncLLMEngine a test left without shutdown(): its daemon step thread would run torch into the exit.
        engine = getattr(getattr(thread, "_target", None), "__self__", None)  # the thread runs engine._loop
        if thread.name == "crosstrim-engine" and engine is not None:
            engine.shutdown()
    gc.collect()
    LEFT_RUNNING.extend(t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive())


LEFT_RUNNING: list[str] = []  # threads alive after clean_exit's teardown (which runs after the last test)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """pytest's own faulthandler ends with the session; a crash after it, in the interpreter's shutdown (seen once:
    exit 139 after every test passed, not reproduced under `python -X faulthandler`), would print nothing. Armed
    again here it names the native frame's Python stacks, every thread's, on stderr."""
    faulthandler.enable(file=sys.__stderr__, all_threads=True)


def pytest_terminal_summary(terminalreporter):
    if LEFT_RUNNING:
        terminalreporter.write_line(f"threads still running at the end of the session: {LEFT_RUNNING}")


@pytest.fixture(scope="session")
def tiny_pipeline():
    from pipeline.inprocess import Pipeline

    return Pipeline()


@pytest.fixture(scope="session")
def imgs():
    from tests.helpers import images

    return images()
