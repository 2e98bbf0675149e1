"""File-system paths given by users, resolved in one place.

Every function that takes a file or directory (checkpoints, the CLI, plots, the demo) accepts a
``str`` (absolute, relative to the working directory, or starting with ``~``) or any
``os.PathLike`` (``pathlib.Path``, ``etils.epath.Path``) and resolves it here, once, to an
absolute ``pathlib.Path``: libraries underneath (orbax, tensorstore) require absolute paths, and
a relative path must keep meaning the directory the user was in when they called.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["resolve"]


def resolve(path: Any, *, what: str = "path") -> Path:
    """``path`` as an absolute :class:`pathlib.Path` (``~`` expanded, symlinks kept).

    Args:
      path: ``str``, ``bytes`` or ``os.PathLike``.
      what: the argument's name, for error messages.

    Raises:
      TypeError: ``path`` is not a path.
      ValueError: ``path`` is empty.

    >>> import os
    >>> resolve("ckpt") == Path(os.getcwd()) / "ckpt"
    True
    >>> resolve("~/x") == Path.home() / "x"
    True
    """
    try:
        text = os.fspath(path)
    except TypeError:
        raise TypeError(
            f"{what} must be a str or an os.PathLike such as pathlib.Path, got "
            f"{type(path).__name__}"
        ) from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text:
        raise ValueError(f"{what} is empty; pass a directory such as 'checkpoints/model'")
    return Path(text).expanduser().absolute()
