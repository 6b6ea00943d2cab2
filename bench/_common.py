"""Shared helpers of the benchmark scripts: finding or building the binaries, starting servers."""

from __future__ import annotations

import os
import platform
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _target_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("CARGO_TARGET_DIR"):
        dirs.append(Path(os.environ["CARGO_TARGET_DIR"]))
    dirs.append(ROOT / "target")
    return dirs


def binary(name: str, package: str, env_var: str) -> Path:
    """The release binary ``name`` of ``package``: ``$env_var`` if set, else built with cargo."""
    if os.environ.get(env_var):
        path = Path(os.environ[env_var])
        if not path.is_file():
            sys.exit(f"{env_var}={path} is not a file")
        return path
    print(f"building {name} (cargo build --release -p {package}) ...", file=sys.stderr, flush=True)
    subprocess.run(
        ["cargo", "build", "-q", "--release", "-p", package, "--bin", name],
        cwd=ROOT,
        check=True,
        timeout=1800,
    )
    for d in _target_dirs():
        path = d / "release" / name
        if path.is_file():
            return path
    sys.exit(f"built {name} but cannot find it under {[str(d) for d in _target_dirs()]}")


def callgrind_instructions(argv: list[str], env: dict[str, str] | None = None, main_thread_only: bool = False) -> int:
    """Instructions `argv` executes under valgrind's callgrind: the whole process, or only its
    main thread (``--separate-threads``: a loopback server on a thread of its own is left out).
    Startup is included; callers difference two runs of different sizes to cancel it."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        flags = ["--separate-threads=yes"] if main_thread_only else []
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", *flags, f"--callgrind-out-file={out}", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
            check=True,
        )
        if main_thread_only:
            # One file per thread; `-01` is the main thread's.
            main = Path(f"{out}-01")
            found = re.search(r"^summary: (\d+)", main.read_text(), re.MULTILINE) if main.is_file() else None
        else:
            found = re.search(r"refs:\s+([\d,]+)", run.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in callgrind's output:\n{run.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


class Server:
    """A child process that prints ``listening on URL`` (and optionally ``resource NAME (REGION)
    at URL`` lines) and serves until stopped. Always stopped on exit of the ``with`` block."""

    def __init__(self, argv: list[str], startup_timeout: float = 30.0) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.url = ""
        self.resources: dict[str, str] = {}
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(out: IO[str]) -> None:
            for line in out:
                lines.put(line)
            lines.put(None)

        assert self.proc.stdout is not None
        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        while True:
            # Once the address is known, the resource lines follow at once: stop when quiet.
            wait = 0.3 if self.url else deadline - time.monotonic()
            if wait <= 0:
                break
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                break
            if line is None:
                break
            line = line.strip()
            if line.startswith("listening on "):
                self.url = line.removeprefix("listening on ").strip()
            elif line.startswith("resource ") and " at " in line:
                self.resources[line.split()[1]] = line.rsplit(" at ", 1)[1].strip()
        if not self.url:
            self.stop()
            self._stderr.seek(0)
            err = self._stderr.read()[-2000:]
            raise RuntimeError(f"{argv[0]} did not start: {err.strip()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def machine() -> str:
    """One line naming the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
        load_s = f", load average {load:.1f} at start"
    except OSError:
        load_s = ""
    return (
        f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}{load_s}"
    )
