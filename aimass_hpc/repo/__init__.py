"""HDF5-backed checkpoint and model repository for parallel filesystems.

>>> from aimass_hpc.repo import ModelRepository
>>> repo = ModelRepository("/lustre/proj/models")
>>> v = repo.save("resnet", model.state_dict(), optimizer=opt.state_dict(), metrics={"acc": .9})
>>> repo.promote("resnet", v.number, "prod")
>>> ckpt = repo.load("resnet@prod")          # tensors mapped from the file, checksums verified

torch is imported only by calls that handle tensors, so listing and searching stay fast. The
names below are loaded lazily: importing :mod:`aimass_hpc.repo.refs` (the model-reference
parser the serve client and the login side use) does not pull in numpy, h5py or xxhash.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aimass_hpc.repo.oserrors import StorageError
    from aimass_hpc.repo.records import Checkpoint, GcReport, VerifyReport, Version
    from aimass_hpc.repo.refs import Ref, parse_ref
    from aimass_hpc.repo.repository import ModelRepository

_HOMES = {
    "Checkpoint": "records",
    "GcReport": "records",
    "ModelRepository": "repository",
    "Ref": "refs",
    "StorageError": "oserrors",
    "VerifyReport": "records",
    "Version": "records",
    "parse_ref": "refs",
}

__all__ = [
    "Checkpoint",
    "GcReport",
    "ModelRepository",
    "Ref",
    "StorageError",
    "VerifyReport",
    "Version",
    "parse_ref",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"aimass_hpc.repo.{home}"), name)
