"""JAX's persistent compilation cache: compiled executables written to disk and reused by the next
process, so a second `jaxinfer generate` skips most of its compile time."""

from __future__ import annotations

import os
from pathlib import Path

from jaxinfer.config import RunConfig

DEFAULT_DIR = RunConfig.compilation_cache  # ~/.cache/jaxinfer/xla: one default, in the config
ENV = "JAXINFER_COMPILATION_CACHE"  # overrides the config: a folder, or "off"


def enable_compilation_cache(path: str | None = DEFAULT_DIR) -> Path | None:
    """Turns the cache on in `path` (None, "" or "off": leaves it off); $JAXINFER_COMPILATION_CACHE
    wins over `path`. Returns the folder in use. Every compile of 0.1 s or more is kept."""
    import jax

    path = os.environ.get(ENV, path)
    if not path or str(path).lower() in ("off", "none", "false", "0"):
        return None
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"compilation_cache='{path}': cannot create the folder ({e.strerror}); "
                         f"choose another, or set compilation_cache: null to run without it") from None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return folder
