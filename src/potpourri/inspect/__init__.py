"""Inspection methods behind one contract: ``fit(normal images)`` / ``predict(images) -> InspectionResult``.

Example:
    from potpourri.inspect import PatchCore, PatchCoreConfig, load_method
    model = PatchCore(PatchCoreConfig()).fit(good_paths); model.save("runs/inspect/v0")
"""

from potpourri.inspect.base import InspectionMethod, InspectionResult, Thresholds, load_method
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig

__all__ = ["InspectionMethod", "InspectionResult", "PatchCore", "PatchCoreConfig", "Thresholds", "load_method"]
