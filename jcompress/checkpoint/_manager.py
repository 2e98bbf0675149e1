"""Use jcompress checkpoints as one item of an ``orbax.checkpoint.CheckpointManager``."""

from __future__ import annotations

import dataclasses
from typing import Any

import orbax.checkpoint as ocp

from jcompress import _fs
from jcompress.checkpoint import _io


class JCompressCheckpointHandler(ocp.CheckpointHandler):
    """An orbax ``CheckpointHandler`` writing the jcompress format (see :func:`save`).

    The manager owns atomicity (it writes each step into a temporary directory and commits
    it), so the handler writes in place.

    >>> import tempfile, numpy as np, orbax.checkpoint as ocp
    >>> with ocp.CheckpointManager(tempfile.mkdtemp()) as mngr:
    ...     _ = mngr.save(0, args=JCompressSave({"w": np.ones(3, np.float32)}))
    ...     mngr.wait_until_finished()
    ...     mngr.restore(0, args=JCompressRestore())["w"]
    array([1., 1., 1.], dtype=float32)
    """

    def save(self, directory: Any, args: JCompressSave) -> None:
        _io.write(_fs.resolve(directory), args.tree)

    def restore(self, directory: Any, args: JCompressRestore | None = None) -> Any:
        shardings = None if args is None else args.shardings
        return _io.load(_fs.resolve(directory), shardings=shardings)

    def metadata(self, directory: Any) -> dict | None:
        try:
            schema = _io.read_schema(_fs.resolve(directory))
        except (FileNotFoundError, ValueError):
            return None
        return {"version": schema["version"], "arrays": len(schema["arrays"])}

    def finalize(self, directory: Any) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(JCompressCheckpointHandler, for_save=True)
@dataclasses.dataclass
class JCompressSave(ocp.args.CheckpointArgs):
    """``CheckpointManager.save`` argument: the tree to save in the jcompress format."""

    tree: Any


@ocp.args.register_with_handler(JCompressCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class JCompressRestore(ocp.args.CheckpointArgs):
    """``CheckpointManager.restore`` argument; ``shardings`` as in :func:`load`."""

    shardings: Any = None
