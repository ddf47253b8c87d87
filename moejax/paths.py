"""Checks on the directories a command reads or writes, made before anything is touched.

Object-store URLs (`gs://bucket/run`, `s3://...`) are rejected with a one-line error: `pathlib` would turn
`gs://bucket/run` into a local `./gs:/bucket/run`, and the trainer's metrics, TensorBoard and damaged-checkpoint
handling write through the local file system. Mount the bucket (e.g. gcsfuse) and pass the mount point.
"""

from __future__ import annotations

import os
import pathlib
import re

from moejax import config

# A URL scheme, or what `pathlib` leaves of one (`gs:/bucket`); two letters at least, so `C:/` is no scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def check_local(path: str | os.PathLike, what: str = "path") -> pathlib.Path:
  """`path` as a local `pathlib.Path`; an object-store URL is a `ConfigError` naming `what`."""
  text = os.fspath(path)
  m = _SCHEME.match(text)
  if m:
    raise config.ConfigError(f"{what} {text!r}: {m.group(1)}:// paths are not supported; use a local or mounted "
                             "directory (e.g. a gcsfuse mount of the bucket)")
  return pathlib.Path(text)


def out_dir(path: str | os.PathLike, what: str = "--workdir") -> pathlib.Path:
  """A directory a command will create or write into: it is a directory or does not exist yet, and its nearest
  existing ancestor is a directory (`--to FILE/out` is an error here, not a `NotADirectoryError` later)."""
  p = check_local(path, what)
  if p.exists() and not p.is_dir():
    raise config.ConfigError(f"{what} {str(p)!r} is an existing file, not a directory")
  for parent in p.absolute().parents:
    if parent.exists():
      if not parent.is_dir():
        raise config.ConfigError(f"{what} {str(p)!r}: {str(parent)!r} is a file, not a directory")
      break
  return p


def in_dir(path: str | os.PathLike, what: str = "--workdir") -> pathlib.Path:
  """A directory a command reads: it exists and is a directory."""
  p = check_local(path, what)
  if not p.exists():
    raise config.ConfigError(f"{what} {str(p)!r} does not exist")
  if not p.is_dir():
    raise config.ConfigError(f"{what} {str(p)!r} is a file, not a directory")
  return p


class RunLock:
  """An exclusive lock on a run directory, so that a second `moejax train` (or TTMM bank build) into a directory
  that one is still writing stops with a one-line error instead of interleaving checkpoints with it: a resubmitted
  job, or the same command in a second terminal, would otherwise overwrite or prune the first one's steps.

  The lock is `flock` on the directory itself: nothing is written into the run, and the kernel drops it when the
  holder exits, however it ends (`kill -9` too), so there is never a stale lock to clear by hand. `acquire` is a
  no-op until the directory exists (a new run takes it just after creating the directory) and once held. Only
  process 0 of a multi-process run locks (the others write into the same directory on its behalf). On a file
  system without `flock` (some network mounts) the run goes on unlocked."""

  def __init__(self, path: pathlib.Path, what: str = "--workdir", primary: bool = True):
    self.path, self.what, self.primary, self._fd = pathlib.Path(path), what, primary, None

  def acquire(self) -> None:
    if self._fd is not None or not self.primary or not self.path.is_dir():
      return
    import errno
    import fcntl

    fd = os.open(self.path, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
        raise config.ConfigError(
          f"{self.what} {str(self.path)!r} is in use by another moejax process still writing there; wait for it "
          f"(or stop it: SIGTERM checkpoints and exits), or choose another {self.what}") from None
      return  # no flock on this file system
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing the descriptor drops the flock
      self._fd = None

  def __enter__(self) -> RunLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()

