"""Ready LightningModules and networks used by the examples and configs."""

from lightning_slsam.models.classifier import Classifier
from lightning_slsam.models.small_cnn import SmallCNN

__all__ = ["Classifier", "SmallCNN"]
