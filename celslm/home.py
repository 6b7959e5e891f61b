"""Where celslm keeps what it downloads and caches on this machine."""

from __future__ import annotations

import os
from pathlib import Path


def celslm_home() -> Path:
    """Where celslm keeps models and caches: `$CELSLM_HOME`, default `~/.cache/celslm`."""
    return Path(os.environ.get("CELSLM_HOME") or Path.home() / ".cache" / "celslm")
