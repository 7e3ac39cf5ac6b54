"""The API and worker processes run on jemalloc when the machine has it (broker.allocator)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from broker import allocator
from broker.allocator import AllocatorError, find_jemalloc, library_to_preload
from broker.devstack import LocalStack, free_port, wait_http
from tests.conftest import IN_CI, SERVICE_KEY, api, chat, wait_job


@pytest.fixture(scope="module")
def jemalloc() -> str:
    library = find_jemalloc()
    if library is None:
        message = "libjemalloc.so.2 is not installed (apt-get install libjemalloc2)"
        if IN_CI:
            pytest.fail(f"{message}; .ci/run installs it")
        pytest.skip(message)
    return library


def mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def wait_for_log(path: Path, text: str, timeout_s: float = 30) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not in {path}:\n{content}")


def test_api_and_worker_run_on_jemalloc_by_default(
        jemalloc: str, make_stack: Callable[..., LocalStack]) -> None:
    stack = make_stack("embedded")
    worker = stack.start_worker(capabilities=["planner"], concurrency=4)
    log = wait_for_log(stack.log_dir / "worker.log", "memory allocator:")
    assert "memory allocator: jemalloc" in log
    # The restart keeps the process id the supervisor knows.
    assert jemalloc in mapped_libraries(worker.pid)
    assert jemalloc in mapped_libraries(stack.procs["api"].pid)
    assert "memory allocator: jemalloc" in (stack.log_dir / "api.log").read_text()

    with api(stack) as client:
        job = client.post("/v1/jobs", json={"capability": "planner", "request": chat("hi")})
        assert job.status_code == 202, job.text
        assert wait_job(client, job.json()["id"])["status"] == "succeeded"


def test_system_allocator_when_asked(jemalloc: str, tmp_path: Path) -> None:
    env = {"MOLAR_LLM_VAR_DIR": str(tmp_path / "var"), "MOLAR_LLM_SERVICE_KEY": SERVICE_KEY,
           "MOLAR_LLM_DATABASE_URL": "", "MOLAR_LLM_BROKER_URL": "",
           "MOLAR_LLM_ALLOCATOR": "system"}
    with LocalStack(tmp_path / "logs", env=env) as stack:
        stack.start_api(free_port())
        assert "libjemalloc" not in mapped_libraries(stack.procs["api"].pid)
        assert "memory allocator: system" in (stack.log_dir / "api.log").read_text()
        wait_http(f"{stack.api_url}/healthz")


def test_a_missing_library_refuses_to_start(tmp_path: Path) -> None:
    missing = str(tmp_path / "libjemalloc.so.2")
    for command in (["serve", "--port", str(free_port())], ["worker"]):
        proc = subprocess.run(
            [sys.executable, "-m", "broker.cli", *command], capture_output=True, text=True,
            timeout=60, env={"PATH": "/usr/bin:/bin", "MOLAR_LLM_ALLOCATOR": missing,
                             "MOLAR_LLM_VAR_DIR": str(tmp_path / "var")},
        )
        assert proc.returncode == 1
        assert f"MOLAR_LLM_ALLOCATOR='{missing}': no such library" in proc.stderr
        assert "'auto'" in proc.stderr and "'system'" in proc.stderr
        assert not (tmp_path / "var").exists(), "nothing may start before the check"


def test_the_keywords_and_a_missing_jemalloc(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    library = tmp_path / "libjemalloc.so.2"
    library.write_bytes(b"")
    monkeypatch.setattr(allocator, "JEMALLOC_PATHS", (str(library),))
    assert library_to_preload({}) == str(library)  # auto
    assert library_to_preload({"MOLAR_LLM_ALLOCATOR": " JEMALLOC "}) == str(library)
    assert library_to_preload({"MOLAR_LLM_ALLOCATOR": "System"}) is None
    assert library_to_preload({"MOLAR_LLM_ALLOCATOR": str(library)}) == str(library)

    library.unlink()
    assert library_to_preload({"MOLAR_LLM_ALLOCATOR": "auto"}) is None  # falls back quietly
    with pytest.raises(AllocatorError) as refused:
        library_to_preload({"MOLAR_LLM_ALLOCATOR": "jemalloc"})
    assert str(library) in str(refused.value)
    assert "apt-get install libjemalloc2" in str(refused.value)


def test_a_library_the_loader_refuses_stops_the_start(tmp_path: Path) -> None:
    not_a_library = tmp_path / "libnot.so"
    not_a_library.write_text("not an ELF file")
    proc = subprocess.run(
        [sys.executable, "-m", "broker.cli", "worker"], capture_output=True, text=True,
        timeout=60, env={"PATH": "/usr/bin:/bin", "MOLAR_LLM_ALLOCATOR": str(not_a_library),
                         "MOLAR_LLM_VAR_DIR": str(tmp_path / "var")},
    )
    assert proc.returncode == 1
    assert "the dynamic loader did not preload it" in proc.stderr
    assert not (tmp_path / "var").exists()
