"""Every experiment of conf/experiment/ composes with the real Hydra config and trains two CPU steps on small local
stand-in data, with the overrides docs/hydra.md shows for a CPU try-out; impossible settings fail in one line before
the model is built."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SHRINK, compose_config
from test_data import fake_cifar10, write_cifar_batch

from lightning_slsam.app.cli import ConfigError, error_line, train

ROOT = Path(__file__).resolve().parents[1]
HYDRA_DOC = ROOT / "docs" / "hydra.md"

#: the CPU try-out command of each experiment, as docs/hydra.md shows it; ~/data, ~/data/sst2, ~/data/mnli and
#: ~/models/roberta-base are replaced by stand-ins written into the test's tmp_path
TRY_OUT = {
    "digits_resnet20": "slsam-train experiment=digits_resnet20 trainer.max_epochs=1 data.train_limit=128",
    "vit_cifar10": (
        "slsam-train experiment=vit_cifar10 data.root=~/data trainer=cpu model.pretrained=false "
        "model.image_size=32 data.image_size=32 data.train_limit=64 data.batch_size=16 data.num_workers=0 "
        "scheduler.warmup_steps=2 trainer.max_epochs=1"
    ),
    "deit_cifar100": (
        "slsam-train experiment=deit_cifar100 data.root=~/data trainer=cpu model.pretrained=false "
        "model.image_size=32 data.image_size=32 data.train_limit=64 data.batch_size=16 data.num_workers=0 "
        "scheduler.warmup_steps=2 trainer.max_epochs=1"
    ),
    "sst2_minilm": (
        "slsam-train experiment=sst2_minilm data.path=~/data/sst2 data.train_limit=64 data.val_limit=64 "
        "scheduler.warmup_steps=2 trainer.max_epochs=1"
    ),
    "roberta_mnli": (
        "slsam-train experiment=roberta_mnli data.path=~/data/mnli trainer=cpu "
        "model.model_name_or_path=~/models/roberta-base data.train_limit=64 data.val_limit=64 data.batch_size=16 "
        "scheduler.warmup_steps=2 trainer.max_epochs=1"
    ),
    "llama_platypus": (
        "slsam-train experiment=llama_platypus model.tiny=true data.path=~/data/platypus.jsonl trainer=cpu "
        "trainer.max_epochs=1"
    ),
}


def experiments() -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


def fake_cifar100(root: Path, train_size: int = 100, test_size: int = 10) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, size in (("train", train_size), ("test", test_size)):
        images = rng.integers(0, 256, size=(size, 3, 32, 32), dtype=np.uint8)
        write_cifar_batch(folder / name, images, [int(x) for x in rng.integers(0, 100, size)], b"fine_labels")
    return folder


def write_sst2(folder: Path) -> None:
    folder.mkdir(parents=True)
    words = ["good", "bad", "fine", "awful", "great", "dull"]
    for name, size in (("train.tsv", 80), ("dev.tsv", 16)):
        rows = [f"a {words[i % 6]} film number {i}\t{int(i % 6 in (0, 2, 4))}" for i in range(size)]
        (folder / name).write_text("text\tlabel\n" + "\n".join(rows) + "\n")


def write_mnli(folder: Path) -> None:
    folder.mkdir(parents=True)
    labels = ["entailment", "neutral", "contradiction"]
    for name, size in (("train.tsv", 80), ("dev_matched.tsv", 16)):
        rows = [f"{i}\tthe cat sat on mat {i}\ta cat sat {i % 3}\t{labels[i % 3]}" for i in range(size)]
        (folder / name).write_text("index\tsentence1\tsentence2\tgold_label\n" + "\n".join(rows) + "\n")


def write_tiny_roberta(folder: Path) -> None:
    """A random-init 2-layer RoBERTa (hidden 32) with the offline MiniLM's tokenizer files: no network."""
    transformers = pytest.importorskip("transformers")
    from lightning_slsam.models.hf_pretrained import minilm_path

    source = Path(minilm_path())
    folder.mkdir(parents=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy(source / name, folder / name)
    config = transformers.RobertaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=160,
        pad_token_id=0,
    )
    transformers.RobertaModel(config).save_pretrained(folder)  # no head, as roberta-base


def stand_ins(experiment: str, tmp_path: Path) -> dict[str, str]:
    """The try-out command's placeholder paths -> stand-in data (and model) written under ``tmp_path``."""
    if experiment == "vit_cifar10":
        fake_cifar10(tmp_path / "data", per_batch=20, test_size=10)
    elif experiment == "deit_cifar100":
        fake_cifar100(tmp_path / "data")
    elif experiment == "sst2_minilm":
        write_sst2(tmp_path / "data" / "sst2")
    elif experiment == "llama_platypus":
        (tmp_path / "data").mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / "tests" / "fixtures" / "instruction_tiny.jsonl", tmp_path / "data" / "platypus.jsonl")
    elif experiment == "roberta_mnli":
        write_mnli(tmp_path / "data" / "mnli")
        write_tiny_roberta(tmp_path / "models" / "roberta-base")
    return {"~/data": str(tmp_path / "data"), "~/models": str(tmp_path / "models")}


def try_out_overrides(experiment: str, tmp_path: Path) -> list[str]:
    overrides = shlex.split(TRY_OUT[experiment])[1:]
    paths = stand_ins(experiment, tmp_path)
    for placeholder, path in paths.items():
        overrides = [o.replace(f"={placeholder}", f"={path}") for o in overrides]
    return overrides


def test_every_experiment_has_a_documented_try_out() -> None:
    assert sorted(TRY_OUT) == experiments()
    text = " ".join(HYDRA_DOC.read_text().split())
    for experiment, command in TRY_OUT.items():
        assert command in text, f"docs/hydra.md does not show the CPU try-out of {experiment}: {command}"


@pytest.mark.parametrize("experiment", experiments())
def test_experiment_trains_two_cpu_steps_with_its_documented_overrides(experiment: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config([*try_out_overrides(experiment, tmp_path), *SHRINK], str(run_dir))
    best = train(cfg)
    record = json.loads((run_dir / "result.json").read_text())
    assert record["experiment"] == experiment and record["finished"] is True
    assert record["steps"] == 2 and 0.0 <= best <= 1.0
    assert record["device"].startswith("cpu")
    if experiment in ("vit_cifar10", "deit_cifar100"):  # validated on images held out of the training files
        data = record["config"]["data"]
        assert data["val_fraction"] > 0


def _build_nothing(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was built although the configuration is impossible")


def test_gpu_trainer_without_a_gpu_says_trainer_cpu_before_building(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lightning.pytorch.accelerators.CUDAAccelerator.is_available", staticmethod(lambda: False))
    monkeypatch.setattr("lightning.pytorch.accelerators.MPSAccelerator.is_available", staticmethod(lambda: False))
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    overrides = [o for o in try_out_overrides("vit_cifar10", tmp_path) if o != "trainer=cpu"]
    cfg = compose_config([*overrides, *SHRINK], str(tmp_path / "run"))
    with pytest.raises(ConfigError) as error:
        train(cfg)
    line = error_line(error.value)
    assert line is not None and "\n" not in line
    assert line.startswith("ConfigError: trainer.accelerator: 'gpu'") and "trainer=cpu" in line


@pytest.mark.parametrize(
    ("extra", "steps"),
    [
        (["trainer.max_epochs=1"], 4),  # 64 images, batches of 16
        (["trainer.max_epochs=2", "trainer.limit_train_batches=1"], 2),
        (["trainer.max_epochs=3", "trainer.max_steps=2"], 2),
        (["trainer.max_epochs=1", "method.accumulate=3"], 2),  # 4 batches in groups of 3: 2 steps
    ],
)
def test_a_warmup_longer_than_the_run_is_refused_before_the_model(
    extra: list[str], steps: int, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    base = [o for o in try_out_overrides("vit_cifar10", tmp_path) if not o.startswith("trainer.max_epochs")]
    cfg = compose_config([*base, *extra, f"scheduler.warmup_steps={steps + 1}"], str(tmp_path / "run"))
    with pytest.raises(ConfigError) as error:
        train(cfg)
    line = error_line(error.value)
    assert line is not None and "\n" not in line
    assert line.startswith(f"ConfigError: scheduler.warmup_steps: {steps + 1} warm-up steps")
    assert f"this run's {steps} optimizer steps" in line


def test_the_experiments_default_warmup_on_a_short_run_names_the_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    base = [o for o in try_out_overrides("vit_cifar10", tmp_path) if not o.startswith("scheduler.")]
    cfg = compose_config(base, str(tmp_path / "run"))
    assert cfg.scheduler.warmup_steps == 500  # the experiment's, for full-length runs
    with pytest.raises(ConfigError) as error:
        train(cfg)
    line = error_line(error.value)
    assert line is not None and "\n" not in line
    assert line.startswith("ConfigError: scheduler.warmup_steps: 500 warm-up steps") and "scheduler=none" in line


def test_scheduler_none_with_an_experiment_that_sets_warmup_runs_at_a_constant_lr(tmp_path: Path) -> None:
    overrides = [o for o in try_out_overrides("deit_cifar100", tmp_path) if not o.startswith("scheduler.")]
    cfg = compose_config([*overrides, "scheduler=none", *SHRINK], str(tmp_path / "run"))
    with pytest.warns(UserWarning, match=r"scheduler=none: a constant learning rate; .*scheduler\.warmup_steps=500"):
        train(cfg)
    record = json.loads((tmp_path / "run" / "result.json").read_text())
    assert record["steps"] == 2


def test_scheduler_none_refuses_a_scheduler_key_given_with_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    overrides = try_out_overrides("deit_cifar100", tmp_path)  # holds scheduler.warmup_steps=2
    cfg = compose_config([*overrides, "scheduler=none"], str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"^scheduler\.warmup_steps: scheduler=none has no such setting"):
        train(cfg)


def test_cifar_train_limit_is_a_declared_key(tmp_path: Path) -> None:
    for data in ("cifar10", "cifar100"):
        cfg = compose_config([f"data={data}", "data.root=x", "data.train_limit=64"], str(tmp_path))
        assert cfg.data.train_limit == 64 and cfg.data.val_fraction == 0.1 and cfg.data.split_seed == 0


# --- what the results record says about costs and pinned arms -------------------------------------------------------
def test_the_second_job_of_a_process_flags_its_cpu_peak_memory_and_slsam_noisy_records_its_pinned_arms(
    tmp_path: Path, monkeypatch
) -> None:
    import torch

    from lightning_slsam.app import run_stats

    monkeypatch.setattr(run_stats, "_fits_started", 0)  # as in a fresh process (pytest ran fits before)
    shared = []
    for job, method in enumerate(("base", "slsam_noisy")):
        run_dir = tmp_path / str(job)
        cfg = compose_config([f"method={method}", "data.train_limit=64", *SHRINK], str(run_dir))
        train(cfg)
        shared.append(json.loads((run_dir / "result.json").read_text())["peak_memory_shared_process"])
    assert shared == [False, True]
    saved = torch.load(tmp_path / "1" / "probabilities.pt", weights_only=False)
    pinned = saved["pinned_arms"]
    assert pinned and set(pinned) <= set(saved["arm_names"])
    assert "net.linear.weight" in pinned and "net.linear.bias" in pinned  # the head
    assert all(not name.endswith(".weight") or name.startswith("net.linear") or "bn" in name for name in pinned)


def test_a_vit_image_size_that_differs_from_the_data_is_refused_before_anything_is_built(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    overrides = [o for o in try_out_overrides("vit_cifar10", tmp_path) if o != "data.image_size=32"]
    cfg = compose_config(overrides, str(tmp_path / "run"))
    with pytest.raises(ConfigError) as error:
        train(cfg)
    line = _one_line_of(error.value)
    assert line.startswith("ConfigError: data.image_size: 224 but model.image_size=32 (vit_small takes images")


def _one_line_of(error: BaseException) -> str:
    line = error_line(error)
    assert line is not None and "\n" not in line
    return line
