"""Inspection methods behind one contract: ``fit(normal images)`` / ``predict(images) -> InspectionResult``.

Contract: anomaly detection only (PatchCore, AnomalyCLIP, WinCLIP); imports core/, data/, models/, report/.

Example:
    from potpourri.inspect import PatchCore, PatchCoreConfig, load_method
    model = PatchCore(PatchCoreConfig()).fit(good_paths); model.save("runs/inspect/v0")
"""

from potpourri.core.results import InspectionResult
from potpourri.inspect.base import InspectionMethod, Thresholds, load_method
from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig

__all__ = ["InspectionMethod", "InspectionResult", "PatchCore", "PatchCoreConfig", "Thresholds", "load_method"]
