"""Ready LightningDataModules used by the examples and configs."""

from lightning_slsam.data.digits import DigitsDataModule

__all__ = ["DigitsDataModule"]
