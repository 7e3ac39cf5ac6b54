"""Run the long-lived processes on jemalloc when the machine has it.

A worker's memory on glibc's allocator keeps creeping up while a large batch drains: freed
memory stays behind in glibc's per-thread arenas, more with more threads, and it cannot be
handed back (``docs/benchmarks.md``, memory). On jemalloc it stays flat. A library
preloaded into a process must be there before the process starts, so ``molar-llm serve``
and ``molar-llm worker`` start themselves again, once, with ``LD_PRELOAD`` set, before they
do anything else. The process id stays the same (``exec``), so supervisors notice nothing.

``MOLAR_LLM_ALLOCATOR`` chooses: ``auto`` (the default) uses jemalloc when one of the usual
library paths has it and the system allocator otherwise; ``jemalloc`` insists on it;
``system`` never preloads; a path names the library to preload. The command refuses to
start when the library it insists on is missing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

ENV_VAR = "MOLAR_LLM_ALLOCATOR"
#: Set on the restarted process, so it never restarts again (a preload the loader refused).
RESTARTED_VAR = "MOLAR_LLM_ALLOCATOR_RESTARTED"
#: Where Debian, Ubuntu, Fedora, Alpine and the python images install jemalloc.
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)


class AllocatorError(Exception):
    """The configured allocator cannot be used; the message says what to change."""


def jemalloc_loaded(maps_file: Path = Path("/proc/self/maps")) -> bool:
    """True when jemalloc is mapped into the process whose ``maps`` file this is."""
    return "libjemalloc" in _read_maps(maps_file)


def _read_maps(maps_file: Path) -> str:
    try:
        return maps_file.read_text()
    except OSError:
        return ""  # not Linux, or the process is gone


def find_jemalloc() -> str | None:
    return next((path for path in JEMALLOC_PATHS if os.path.isfile(path)), None)


def library_to_preload(environ: Mapping[str, str]) -> str | None:
    """The library this process should restart with, or None to go on as it is."""
    choice = environ.get(ENV_VAR, "auto").strip() or "auto"
    keyword = choice.lower()
    if keyword == "system":
        return None
    if not sys.platform.startswith("linux"):
        if keyword == "auto":
            return None
        raise AllocatorError(f"{ENV_VAR}={choice!r}: preloading an allocator works on Linux "
                             f"only; set {ENV_VAR} to 'auto' or 'system'.")
    if jemalloc_loaded():
        return None
    if keyword == "auto":
        return find_jemalloc()
    if keyword == "jemalloc":
        found = find_jemalloc()
        if found is None:
            raise AllocatorError(
                f"{ENV_VAR}=jemalloc: libjemalloc.so.2 is in none of "
                f"{', '.join(JEMALLOC_PATHS)}. Install it (Debian: apt-get install "
                f"libjemalloc2), give its path in {ENV_VAR}, or set {ENV_VAR} to 'auto' "
                f"(jemalloc when found) or 'system'."
            )
        return found
    if not os.path.isfile(choice):
        raise AllocatorError(
            f"{ENV_VAR}={choice!r}: no such library. Install jemalloc (Debian: apt-get "
            f"install libjemalloc2) and give its path, or set {ENV_VAR} to 'auto' (jemalloc "
            f"when found) or 'system' (the C library's allocator)."
        )
    return os.path.abspath(choice)


def restart_on_jemalloc() -> None:
    """Replace this process with the same command preloaded with jemalloc, when it should
    be; returns only when the process goes on as it is."""
    if os.environ.pop(RESTARTED_VAR, None):
        # This is the restarted process (its children decide for themselves). An allocator
        # asked for by name or path must really be there: the loader skips a preload it
        # cannot load with no more than a message on stderr.
        choice = os.environ.get(ENV_VAR, "auto").strip() or "auto"
        if choice.lower() not in ("auto", "system") and describe().startswith("system"):
            raise AllocatorError(
                f"{ENV_VAR}={choice!r}: the dynamic loader did not preload it (its message "
                f"is above); check that it is a shared library for this machine, or set "
                f"{ENV_VAR} to 'auto' or 'system'."
            )
        return
    library = library_to_preload(os.environ)
    if library is None:
        return
    preload = os.environ.get("LD_PRELOAD", "")
    env = {**os.environ, RESTARTED_VAR: "1",
           "LD_PRELOAD": f"{library}:{preload}" if preload else library}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def describe() -> str:
    """The allocator this process runs on, for its start-up log line."""
    maps = _read_maps(Path("/proc/self/maps"))
    if "libjemalloc" in maps:
        return "jemalloc"
    configured = os.environ.get(ENV_VAR, "").strip()
    if configured.lower() not in ("", "auto", "system", "jemalloc"):
        path = os.path.realpath(configured)
        if path in maps:
            return path  # another allocator, named by its path
    return "system (the C library's malloc)"
