"""Data in: dataset layouts on disk, the DS-Synth defect benchmark, and the ImageNet-C corruption suite.

Contract: imports core/ only.

Example:
    >>> from potpourri.data import make_task
    >>> task = make_task("classification", categories=("brick",), n_per_class=1, size=64)
    >>> task.train_images.shape, task.class_names[1]
    ((7, 64, 64, 3), 'scratch')
"""

from potpourri.data.corruptions import CORRUPTIONS, Corrupted, corrupt
from potpourri.data.layouts import DefectSpectrum, DSSynth, Folder, ImageFolder, MVTecAD, Sample
from potpourri.data.synth import CATEGORIES, CLASSES, SynthSample, SynthTask, make_samples, make_task, write_ds_synth

__all__ = [
    "CATEGORIES",
    "CLASSES",
    "CORRUPTIONS",
    "Corrupted",
    "DSSynth",
    "DefectSpectrum",
    "Folder",
    "ImageFolder",
    "MVTecAD",
    "Sample",
    "SynthSample",
    "SynthTask",
    "corrupt",
    "make_samples",
    "make_task",
    "write_ds_synth",
]
