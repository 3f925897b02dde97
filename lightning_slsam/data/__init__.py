"""Ready LightningDataModules used by the examples and configs."""

from lightning_slsam.data.cifar import CIFARDataModule
from lightning_slsam.data.digits import DigitsDataModule
from lightning_slsam.data.glue import GLUE_TASKS, GLUEDataModule
from lightning_slsam.data.instruction import InstructionDataModule
from lightning_slsam.data.resumable_loader import ResumableDataLoader, ResumableDataModule, ResumableSampler
from lightning_slsam.data.text_tsv import TextTSVDataModule

__all__ = [
    "GLUE_TASKS",
    "CIFARDataModule",
    "DigitsDataModule",
    "GLUEDataModule",
    "InstructionDataModule",
    "ResumableDataLoader",
    "ResumableDataModule",
    "ResumableSampler",
    "TextTSVDataModule",
]
