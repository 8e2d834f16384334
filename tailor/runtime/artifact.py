"""The artifact directory: written whole into a temp dir and renamed into place.

    plan.json      the plan (versioned schema)
    report.json    what was recognised, applied, measured
    run.yaml       the resolved configuration; `optimize --config run.yaml` replays the run
    model.onnx | model.safetensors + config.json (+ tokenizer files)
    manifest.json  sha256 of every other file
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from tailor.core.digests import sha256_file
from tailor.core.errors import TailorError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_held: dict[Path, int] = {}  # output locks this process holds, with their nesting depth


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise TailorError(f"{out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise TailorError(f"{out} exists and is not a directory")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Held by a run for as long as it may write `out`: a second run (another process) to the same
    output fails at once with a clear error instead of racing it. Under the lock, temp dirs that a
    killed run left beside `out` are removed. The lock file is unlinked on release; a run that
    locked a file just unlinked retries on the new one."""
    out = Path(out).absolute()
    if out in _held:
        _held[out] += 1
        try:
            yield
        finally:
            _held[out] -= 1
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TailorError(f"{out}: another tailor run is writing it; wait for it to finish or "
                              f"choose another output") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    _held[out] = 1
    try:
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in out.parent.glob(f".{out.name}.old-*"):
            if (stale / out.name).is_dir() and not out.exists():  # killed mid-swap: put it back
                os.replace(stale / out.name, out)
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        del _held[out]
        os.unlink(path)
        os.close(fd)


def write_artifact(out: Path, write: Callable[[Path], None], *, force: bool = False,
                   check: Callable[[Path], None] | None = None) -> Path:
    """Call write(tmp_dir) to fill a temp dir beside `out`, add the manifest, run check(tmp_dir)
    (validation: raise to abandon), rename into place. A crash or a failed check at any point
    leaves `out` as it was (or absent), never half-written."""
    out = Path(out)
    with output_lock(out):
        check_output_dir(out, force)
        _write_locked(out, write, check)
    return out


def _write_locked(out: Path, write: Callable[[Path], None], check: Callable[[Path], None] | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {"version": MANIFEST_VERSION,
                    "files": {p.relative_to(tmp).as_posix(): sha256_file(p) for p in files}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if check is not None:
            check(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_artifact(folder: Path) -> dict[str, str]:
    """Check every file against manifest.json; refuse paths that leave the folder."""
    folder = Path(folder)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise TailorError(f"{folder}: not a tailor artifact (no {MANIFEST})")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        assert isinstance(files, dict)
    except Exception:
        raise TailorError(f"{mpath}: unreadable manifest") from None
    if manifest.get("version", 0) > MANIFEST_VERSION:
        raise TailorError(f"{mpath}: manifest version {manifest.get('version')} is newer than this "
                          f"tailor understands ({MANIFEST_VERSION}); upgrade tailor")
    root = folder.resolve()
    for rel, digest in files.items():
        p = (folder / rel).resolve()
        if Path(rel).is_absolute() or not p.is_relative_to(root):
            raise TailorError(f"{mpath}: file entry '{rel}' points outside the artifact")
        if not p.is_file():
            raise TailorError(f"{folder}: {rel} listed in the manifest is missing")
        if sha256_file(p) != digest:
            raise TailorError(f"{folder}: {rel} does not match its sha256 in the manifest "
                              f"(modified or corrupt)")
    return files
