"""Reading a file an operator names (a policy, a tests file, a dev issuer config, a token file) so
that no file can hang the reader or exhaust its memory.

Why a module: a FIFO at the path blocks ``open``/``read`` forever (a reload thread that never
returns also stops SIGTERM from ending the process), and a device such as ``/dev/zero`` or a huge
file exhausts memory. Every reader of such files goes through ``read_bounded``; each caller turns
``FileReadError`` into its own error type with the same message.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

REGULAR_FILE_FIX = "point the path at a regular file"


class FileReadError(ValueError):
    """A file that cannot be read as the caller's kind of file; the message names the path and the fix."""


def read_bounded(
    path: Path | str, kind: str, limit: int, too_large_fix: str, *, regular_fix: str | None = None, read_fix: str = ""
) -> bytes:
    """At most ``limit`` bytes of ``path`` (FileReadError beyond them), ``kind`` naming the file in
    messages ("policy file"); ``read_fix`` is added to the message of a file that cannot be opened.

    With ``regular_fix`` (the fix a message names), only a regular file is read: the path is never
    even opened otherwise, it is opened with O_NONBLOCK (a FIFO swapped in returns at once) and the
    *opened* file is checked again with fstat (no race with a swap between check and read).
    Without it, a pipe is read too (``--token-file <(command)``), blocking as a pipe does, and a
    device is read only up to the limit.
    """
    path = Path(path)

    def unreadable(exc: OSError) -> FileReadError:
        return FileReadError(f"{path}: cannot read {kind}: {exc.strerror or exc}{read_fix and '; ' + read_fix}")

    try:
        if regular_fix is not None:
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise FileReadError(f"{path}: not a regular file ({_file_kind(mode)}); {regular_fix}")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | (os.O_NONBLOCK if regular_fix else 0))
    except OSError as exc:
        raise unreadable(exc) from None
    try:
        info = os.fstat(fd)
        if regular_fix is not None and not stat.S_ISREG(info.st_mode):
            raise FileReadError(f"{path}: not a regular file ({_file_kind(info.st_mode)}); {regular_fix}")
        if stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise too_large(path, f"{info.st_size} bytes", kind, limit, too_large_fix)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # st_size can be stale (a file still growing): count what we read
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise too_large(path, "more", kind, limit, too_large_fix)
        return b"".join(chunks)
    except OSError as exc:
        raise unreadable(exc) from None
    finally:
        os.close(fd)


def utf8_text(raw: bytes, source: str) -> str:
    """``raw`` as text; FileReadError naming the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileReadError(f"{source}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None


def too_large(path: Path | str, size: str, kind: str, limit: int, fix: str) -> FileReadError:
    """``size``: the file's size ("3000000 bytes"), or "more" for a stream read past ``limit``."""
    said = "" if size == "more" else f"{size} is "
    return FileReadError(f"{path}: {said}larger than a {kind} may be ({limit} bytes, {_human(limit)}); {fix}")


def _human(limit: int) -> str:
    return f"{limit // 1024 // 1024} MiB" if limit % (1024 * 1024) == 0 else f"{limit // 1024} KiB"


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")
