"""`make test-stress`: the e2e suite in a shuffled order while one busy loop per CPU core competes
with it for the CPU, as on a shared CI machine or a laptop running something else.

Why: a test that waits on the clock instead of an event passes on an idle machine and fails on a
busy one; this finds it before CI does. The busy loops are started here and always stopped here
(on failure, Ctrl-C and SIGTERM too, after pytest tore down what the tests started); each one
also exits by itself once this runner is gone.
The order is shuffled per module and between modules (pytest-random-order); the seed is printed,
and ``make test-stress STRESS_SEED=<seed>`` replays that order.

    python -m tests.stress [--seed N] [--hogs N] [-- pytest args...]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# A busy loop that exits when its parent (this runner) is gone, even if the runner was SIGKILLed.
HOG = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(1_000_000):\n        pass\n"


def start_hogs(count: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.DEVNULL) for _ in range(count)]


def stop_hogs(hogs: Sequence[subprocess.Popen[bytes]]) -> None:
    for hog in hogs:
        if hog.poll() is None:
            hog.kill()
    for hog in hogs:
        hog.wait()


def wait_for_pytest(pytest: subprocess.Popen[bytes]) -> int:
    """pytest's exit code. Ctrl-C reaches pytest too (same process group): it tears its fixtures
    down, stops what the tests started, reports, and exits; we wait for that instead of killing it."""
    while True:
        try:
            return pytest.wait()
        except KeyboardInterrupt:
            continue


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="replay the order of an earlier run")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1, help="busy loops (default: one per core)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    command = [sys.executable, "-m", "pytest", "-m", "e2e", "-p", "no:cacheprovider",
               "--random-order-bucket=module", f"--random-order-seed={seed}", *args.pytest_args]
    print(f"test-stress: {args.hogs} CPU hog(s), seed {seed} (replay: make test-stress STRESS_SEED={seed})",
          flush=True)
    started = time.monotonic()
    hogs = start_hogs(args.hogs)
    try:
        pytest = subprocess.Popen(command, cwd=REPO_ROOT)
        # SIGTERM (a CI job cancelled): pytest on SIGTERM would die without its teardown, so it gets
        # the Ctrl-C it handles instead, and we go on waiting for it.
        signal.signal(signal.SIGTERM, lambda signum, frame: pytest.send_signal(signal.SIGINT))
        returncode = wait_for_pytest(pytest)
    finally:
        stop_hogs(hogs)
    print(f"test-stress: seed {seed}, exit {returncode}, {time.monotonic() - started:.0f}s "
          f"(replay: make test-stress STRESS_SEED={seed})", flush=True)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
