"""free_port's share of the port range: test runs, benches and demos side by side on one machine
draw their ports from shares no other process holds, so none binds a port another just chose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.harness import PORT_BLOCKS, REPO_ROOT, claim_port_block

LOW = 32768  # the start of Linux's default ephemeral range
HOLD = """
import sys
from pathlib import Path
from tests.e2e.harness import claim_port_block
share, fd = claim_port_block(Path(sys.argv[1]), int(sys.argv[2]))
print(share.start, share.stop, fd is not None, flush=True)
sys.stdin.read()  # hold the share until the test closes our stdin
"""


def test_each_claim_gets_a_share_of_its_own_until_none_is_left(tmp_path: Path) -> None:
    held = [claim_port_block(tmp_path, LOW) for _ in range(PORT_BLOCKS)]
    try:
        shares = [share for share, _ in held]
        assert all(fd is not None for _, fd in held)
        assert all(10_000 <= s.start < s.stop <= LOW for s in shares)
        assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1:])
        # Every share held: the whole range, and nothing to hold.
        assert claim_port_block(tmp_path, LOW) == (range(10_000, LOW), None)
        # A share let go is claimed again.
        os.close(held[1][1])  # type: ignore[arg-type]
        share, fd = claim_port_block(tmp_path, LOW)
        held[1] = (share, fd)
        assert share == shares[1]
    finally:
        for _, fd in held:
            if fd is not None:
                os.close(fd)


def test_another_process_holds_its_share_until_it_ends(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), str(LOW)], cwd=REPO_ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdin is not None
        start, stop, holds = other.stdout.readline().split()
        theirs = range(int(start), int(stop))
        assert holds == "True"
        mine, fd = claim_port_block(tmp_path, LOW)
        assert fd is not None
        os.close(fd)
        assert not set(mine) & set(theirs)
        other.stdin.close()
        assert other.wait(timeout=60) == 0
        # It ended: its share is free again, and the first share is the one it held.
        again, fd = claim_port_block(tmp_path, LOW)
        assert fd is not None
        os.close(fd)
        assert again == theirs
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()
