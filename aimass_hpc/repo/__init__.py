"""HDF5-backed checkpoint and model repository for parallel filesystems.

>>> from aimass_hpc.repo import ModelRepository
>>> repo = ModelRepository("/lustre/proj/models")
>>> v = repo.save("resnet", model.state_dict(), optimizer=opt.state_dict(), metrics={"acc": .9})
>>> repo.promote("resnet", v.number, "prod")
>>> ckpt = repo.load("resnet@prod")          # tensors mapped from the file, checksums verified

torch is imported only by calls that handle tensors, so listing and searching stay fast.
"""

from aimass_hpc.repo.oserrors import StorageError
from aimass_hpc.repo.records import Checkpoint, GcReport, VerifyReport, Version
from aimass_hpc.repo.refs import Ref, parse_ref
from aimass_hpc.repo.repository import ModelRepository

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
