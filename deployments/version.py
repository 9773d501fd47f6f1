"""What a server is running: the crosstrim package's version and the git revision of its code, when known."""

import os
import subprocess
from importlib import metadata
from pathlib import Path

REVISION_ENV = "CROSSTRIM_REVISION"  # the image's build arg (an image has no .git); else the checkout's HEAD


def package_version() -> str:
    try:
        return metadata.version("crosstrim")
    except metadata.PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


def git_revision() -> str | None:
    """$CROSSTRIM_REVISION, or HEAD of the git checkout the code runs from (an editable install), or None."""
    if os.environ.get(REVISION_ENV):
        return os.environ[REVISION_ENV]
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # installed into site-packages: a repository around it is not ours
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
