"""Local folders: a listing that never leaves the corpus or loops, and a publish by rename
or hard link."""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import uuid
from pathlib import Path
from typing import Iterator

from pipeline.errors import PipelineError

from pipeline.storage.paths import Listed, is_document, local_path

log = logging.getLogger("luigi-interface")


class LocalBackend:
    def exists(self, path: str) -> bool:
        return local_path(path).exists()

    def read_bytes(self, path: str) -> bytes:
        return local_path(path).read_bytes()

    def list(self, root: str, pattern: str, hashes: bool = True) -> Iterator[Listed]:
        """Files in full-path sorted order (the order a bucket lists in), streamed:
        only one folder's entries are held at a time. ``hashes=False`` leaves
        ``content_hash`` empty instead of reading every file (an output's own files).

        Only what is inside the corpus is listed, and listing always ends: a symlinked
        folder is never followed (it may loop back to a parent or lead out of the
        corpus; folders inside the corpus are listed under their own path anyway); a
        symlinked file is listed only if it resolves to a regular file inside the
        corpus. Entries that are not regular files (pipes, sockets, devices: reading
        one can block forever), names that are not UTF-8 (a manifest path is text),
        and files that cannot be read to hash them (deleted meanwhile, no permission) are
        skipped, each with a warning.
        """
        base = local_path(root)
        if not base.is_dir():
            return
        real_base = base.resolve()

        def skip(path: Path, why: str) -> None:
            log.warning("corpus: skipped %s: %s", os.fsencode(path).decode("utf-8", "backslashreplace"), why)

        def walk(folder: Path, prefix: str) -> Iterator[Listed]:
            entries = []
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.name.startswith("."):
                        continue
                    try:
                        kind = _kind(entry, real_base)
                    except OSError as exc:  # a link that loops on itself, a file that is gone
                        kind = exc.strerror or str(exc)
                    if kind in ("folder", "file"):
                        entries.append((entry.name + ("/" if kind == "folder" else ""), entry.name, kind == "folder"))
                    else:
                        skip(folder / entry.name, kind)
            for _, name, is_dir in sorted(entries):
                relative = prefix + name
                if is_dir:
                    yield from walk(folder / name, relative + "/")
                elif is_document(relative, pattern):
                    try:
                        data_hash, size = hash_file(folder / name) if hashes else ("", (folder / name).stat().st_size)
                    except OSError as exc:  # deleted since the folder was read, or unreadable
                        skip(folder / name, f"could not be read to hash it: {exc.strerror or exc}")
                        continue
                    yield Listed(relative, size, data_hash)

        yield from walk(base, "")

    def version(self, path: str) -> str | None:
        try:
            stat = local_path(path).stat()
        except FileNotFoundError:
            return None
        return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"  # a rename in is a new inode

    def publish(self, local: Path, dest: str, overwrite: bool, if_version: str | None = None) -> bool:
        final = local_path(dest)
        final.parent.mkdir(parents=True, exist_ok=True)
        if if_version is not None:
            # A rename cannot be conditional: the look and the rename happen under a lock
            # that every compare-and-swap of this file takes.
            with open(final.parent / f".{final.name}.lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if self.version(dest) != if_version:
                    return False
                os.replace(local, final)
        elif overwrite:
            os.replace(local, final)
        else:
            try:
                os.link(local, final)  # fails if ``final`` exists: exactly-once
            except FileExistsError:
                return False
            except OSError:
                # A filesystem without hard links: check, then rename. Two racing writers
                # may both rename, but each renames a whole, identical file; the name is
                # never seen pointing at a partial one.
                if final.exists():
                    return False
                os.replace(local, final)
            else:
                local.unlink()
        fsync_folder(final.parent)
        return True

    def delete(self, path: str) -> None:
        local_path(path).unlink(missing_ok=True)

    def check_writable(self, root: str) -> None:
        folder = local_path(root)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write-test-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PipelineError(f"cannot write to output {root}: {exc.strerror or exc}") from exc

    def check_readable(self, root: str) -> None:
        folder = local_path(root)
        if not folder.exists():
            raise PipelineError(f"corpus path {root} does not exist")
        if not folder.is_dir():
            raise PipelineError(f"corpus path {root} is not a folder")


def _kind(entry: os.DirEntry, real_base: Path) -> str:
    """``folder`` or ``file`` for what a local listing walks into or lists, else why not."""
    if not _is_utf8(entry.name):
        return "the name is not UTF-8"
    if entry.is_dir(follow_symlinks=False):
        return "folder"
    if not entry.is_symlink():
        return "file" if entry.is_file(follow_symlinks=False) else "not a regular file"
    if not Path(os.path.realpath(entry.path)).is_relative_to(real_base):
        return "a symbolic link that leads out of the corpus"
    if entry.is_dir():
        return "a symbolic link to a folder is not followed"
    return "file" if entry.is_file() else "a symbolic link to no regular file"


def _is_utf8(name: str) -> bool:
    """Whether a file name decoded cleanly (undecodable bytes come back as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def hash_file(path: Path) -> tuple[str, int]:
    digest = hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def fsync_folder(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
