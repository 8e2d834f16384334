"""Where tailor keeps what it may reuse between runs: profiles, cost-model fits, the default model's
export ($TAILOR_CACHE, else $XDG_CACHE_HOME/tailor)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("TAILOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tailor")
    return Path(root)
