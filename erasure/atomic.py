"""Writing so that a crash at any moment leaves the complete old file or folder or the complete new one.

`write_atomically` writes a file beside its target and renames it over; `build_atomically` builds a
folder (a cache entry, a checkpoint) beside its target and renames it into place. `replace_folder` does the
same for a whole folder (an export): the new folder is written beside the target (same parent, so
the same file system), then the two are exchanged in one `renameat2(RENAME_EXCHANGE)` call where
Linux offers it. Elsewhere the old folder is first renamed aside to `.NAME.old` and the new one
renamed into place; a crash between the two renames leaves the old folder complete under
`.NAME.old`, which `recover_folder` puts back.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path

TMP_SUFFIX = ".tmp"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the platform or file system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def aside(target: Path) -> Path:
    """Where the fallback keeps the old folder while the new one moves in."""
    return target.with_name(f".{target.name}.old")


def staging_beside(target: Path, purpose: str) -> Path:
    """An empty folder next to `target` to build its replacement in."""
    staging = target.with_name(f".{target.name}.{purpose}-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def recover_folder(target: Path) -> bool:
    """Put back an old folder that a crash left aside; True if it did."""
    old = aside(target)
    if not target.exists() and old.is_dir():
        old.rename(target)
        return True
    return False


def replace_folder(staged: Path, target: Path) -> None:
    """Make the complete folder `staged` the folder `target`; whatever `target` held is gone after."""
    if not target.exists():
        staged.rename(target)
        return
    if _exchange(staged, target):
        shutil.rmtree(staged)  # now the old folder
        return
    old = aside(target)
    shutil.rmtree(old, ignore_errors=True)
    target.rename(old)
    staged.rename(target)
    shutil.rmtree(old)


def finite_or_none(value):
    """`value` with every NaN or infinite float replaced by None: what we write is strict JSON
    (Python's json writes NaN, which other readers reject), and a missing number reads as missing."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def strict_json(value, **options) -> str:
    return json.dumps(finite_or_none(value), allow_nan=False, **options) + "\n"


def write_atomically(path: Path, write) -> None:
    """write(file) into a temporary sibling, flushed to disk, then renamed over `path`: a reader (or a
    rerun after a kill) sees the old file or the complete new one, never a partial one."""
    # Not mkstemp: its files are private (0600); os.open's mode goes through the umask like open's.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_atomically(target: Path, builder) -> Path:
    """Build into a temporary sibling and rename, so a crash or a second process (another DDP
    rank) never sees a half-written folder. Returns the finished folder."""
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        builder(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not target.exists():  # lost a race to another process, which is fine; else re-raise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
