"""`make test-stress`: the e2e suite in a shuffled order while one busy loop per CPU core competes
with it for the CPU, as on a shared CI machine or a laptop running something else.

Why: a test that waits on the clock instead of an event passes on an idle machine and fails on a
busy one; this finds it before CI does. The busy loops are started here and always stopped here
(on failure, Ctrl-C and SIGTERM too); each one also exits by itself once this runner is gone.
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


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally that stops the hogs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="replay the order of an earlier run")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1, help="busy loops (default: one per core)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1_000_000)
    command = [sys.executable, "-m", "pytest", "-m", "e2e", "-p", "no:cacheprovider",
               "--random-order-bucket=module", f"--random-order-seed={seed}", *args.pytest_args]
    signal.signal(signal.SIGTERM, _terminated)
    print(f"test-stress: {args.hogs} CPU hog(s), seed {seed} (replay: make test-stress STRESS_SEED={seed})",
          flush=True)
    started = time.monotonic()
    hogs = start_hogs(args.hogs)
    try:
        returncode = subprocess.call(command, cwd=REPO_ROOT)
    except KeyboardInterrupt:  # Ctrl-C reached pytest too; it reports and stops on its own
        returncode = 130
    finally:
        stop_hogs(hogs)
    print(f"test-stress: seed {seed}, exit {returncode}, {time.monotonic() - started:.0f}s "
          f"(replay: make test-stress STRESS_SEED={seed})", flush=True)
    return returncode


if __name__ == "__main__":
    sys.exit(main())
