"""Ready LightningModules and networks used by the examples and configs."""

from lightning_slsam.models.byte_tokenizer import ByteTokenizer
from lightning_slsam.models.causal_lm import CausalLM
from lightning_slsam.models.classifier import Classifier
from lightning_slsam.models.hf_pretrained import minilm_path
from lightning_slsam.models.resnet_cifar import ResNetCIFAR, resnet20_cifar
from lightning_slsam.models.small_cnn import SmallCNN
from lightning_slsam.models.text_classifier import TextClassifier
from lightning_slsam.models.vision import torchvision_resnet, vit

__all__ = [
    "ByteTokenizer",
    "CausalLM",
    "Classifier",
    "ResNetCIFAR",
    "SmallCNN",
    "TextClassifier",
    "minilm_path",
    "resnet20_cifar",
    "torchvision_resnet",
    "vit",
]
