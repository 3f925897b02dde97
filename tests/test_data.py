"""The ready data modules: digits, CIFAR (a small stand-in written in the official layout), GLUE (the shared SST-2
files and GLUE-format files written here) and any labelled TSV; argument errors name the argument."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_slsam.data import CIFARDataModule, DigitsDataModule, GLUEDataModule, TextTSVDataModule
from lightning_slsam.data.cifar import NORMALIZATIONS
from lightning_slsam.data.tokenized_text import PaddingCollate
from lightning_slsam.models import minilm_path

SST2 = Path(__file__).parents[2] / "shared/data/sst2"
needs_sst2 = pytest.mark.skipif(not (SST2 / "train.tsv").is_file(), reason=f"shared SST-2 files not found at {SST2}")
TOKEN_FIELDS = {"input_ids", "attention_mask", "labels"}


def write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def decode(batch_ids: list[int]) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    return tokenizer.decode(batch_ids, skip_special_tokens=True)


# --- digits -------------------------------------------------------------------------------------------------------
def test_digits_split_shapes_and_options() -> None:
    data = DigitsDataModule(batch_size=32)
    data.setup()
    assert data.train_set is not None and data.val_set is not None
    assert (len(data.train_set), len(data.val_set)) == (1438, 359)
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and labels.dtype == torch.long
    assert images.min() >= -1.0 and images.max() <= 1.0

    big = DigitsDataModule(batch_size=4, image_size=32, channels=3, train_limit=100)
    big.setup()
    assert big.train_set is not None and len(big.train_set) == 100
    assert next(iter(big.train_dataloader()))[0].shape == (4, 3, 32, 32)


def test_digits_label_noise_is_seeded_and_train_only() -> None:
    clean, noisy, again = (DigitsDataModule(label_noise=n, seed=3) for n in (0.0, 0.3, 0.3))
    for data in (clean, noisy, again):
        data.setup()
    clean_labels, noisy_labels = clean.train_set.tensors[1], noisy.train_set.tensors[1]  # type: ignore[union-attr]
    flipped = (clean_labels != noisy_labels).float().mean().item()
    assert 0.2 < flipped < 0.4
    assert torch.equal(noisy_labels, again.train_set.tensors[1])  # type: ignore[union-attr]
    assert torch.equal(clean.val_set.tensors[1], noisy.val_set.tensors[1])  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"channels": 2}, "channels"),
        ({"train_limit": 0}, "train_limit"),
        ({"label_noise": 1.0}, "label_noise"),
    ],
)
def test_digits_bad_arguments_are_named(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        DigitsDataModule(**kwargs)


# --- CIFAR (a stand-in in torchvision's on-disk layout) -----------------------------------------------------------
def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: bytes) -> None:
    """One pickled batch as the official files hold it (bytes keys, ``data`` rows of 3072 uint8 in CHW order)."""
    batch = {b"batch_label": b"stand-in", label_key: labels, b"data": images.reshape(len(labels), -1)}
    with path.open("wb") as handle:
        pickle.dump(batch, handle)


def fake_cifar10(root: Path, per_batch: int = 4, test_size: int = 6) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_size)]:
        images = rng.integers(0, 256, size=(size, 3, 32, 32), dtype=np.uint8)
        write_cifar_batch(folder / name, images, [int(x) for x in rng.integers(0, 10, size)], b"labels")
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, handle)
    return folder


def test_cifar10_stand_in_loads_and_normalises(tmp_path: Path) -> None:
    folder = fake_cifar10(tmp_path)
    data = CIFARDataModule(root=str(tmp_path), batch_size=4, augment=True, val_fraction=0.0)
    assert data.num_classes == 10
    data.setup()
    assert data.train_set is not None and data.val_set is data.test_set and data.test_set is not None
    assert (len(data.train_set), len(data.test_set)) == (20, 6)  # val_fraction=0: the test split validates
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.long

    with (folder / "test_batch").open("rb") as handle:
        raw = pickle.load(handle)
    val_images, val_labels = next(iter(data.val_dataloader()))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    expected = (torch.from_numpy(raw[b"data"]).view(-1, 3, 32, 32).float() / 255 - mean) / std
    torch.testing.assert_close(val_images, expected)
    assert val_labels.tolist() == raw[b"labels"]


def test_cifar_held_out_validation_resize_and_root_as_the_folder(tmp_path: Path) -> None:
    folder = fake_cifar10(tmp_path)
    data = CIFARDataModule(root=str(folder), batch_size=2, val_fraction=0.25, image_size=48, normalize="half")
    data.setup()
    assert data.train_set is not None and data.val_set is not None and data.test_set is not None
    assert (len(data.train_set), len(data.val_set), len(data.test_set)) == (15, 5, 6)
    images, _ = next(iter(data.val_dataloader()))
    assert images.shape == (4, 3, 48, 48) and images.min() >= -1.0 and images.max() <= 1.0
    assert next(iter(data.test_dataloader()))[0].shape == (4, 3, 48, 48)


def test_cifar_holds_out_validation_by_default_the_same_images_for_every_seed(tmp_path: Path) -> None:
    fake_cifar10(tmp_path, per_batch=8)  # 40 training images
    held_out = []
    for seed in (0, 1):
        data = CIFARDataModule(root=str(tmp_path), batch_size=4, augment=False, seed=seed, train_limit=20)
        data.setup()
        assert data.val_set is not None and data.val_set is not data.test_set and len(data.val_set) == 4
        assert data.train_set is not None and len(data.train_set) == 20
        train_rows = {tuple(image.flatten().tolist()[:16]) for image in data.train_set.images}
        val_rows = {tuple(image.flatten().tolist()[:16]) for image in data.val_set.images}
        assert not train_rows & val_rows, "a validation image is also trained on"
        held_out.append(data.val_set.images)
    assert torch.equal(held_out[0], held_out[1]), "the held-out images changed with the seed"
    other = CIFARDataModule(root=str(tmp_path), batch_size=4, split_seed=1)
    other.setup()
    assert other.val_set is not None and not torch.equal(other.val_set.images, held_out[0])


def test_cifar100_stand_in(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, size in (("train", 12), ("test", 4)):
        images = rng.integers(0, 256, size=(size, 3, 32, 32), dtype=np.uint8)
        write_cifar_batch(folder / name, images, [int(x) for x in rng.integers(0, 100, size)], b"fine_labels")
    data = CIFARDataModule(root=str(tmp_path), name="cifar100", batch_size=3, train_limit=9)
    data.setup()
    assert data.num_classes == 100 and data.train_set is not None and len(data.train_set) == 9
    assert next(iter(data.train_dataloader()))[1].max() < 100


def test_cifar_missing_files_name_root_and_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"root.*data\.download=true"):
        CIFARDataModule(root=str(tmp_path / "nothing"))
    CIFARDataModule(root=str(tmp_path / "nothing"), download=True)  # fetching is prepare_data's job, not __init__'s


def test_cifar_verify_checks_the_official_md5(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    data = CIFARDataModule(root=str(tmp_path), verify=True)
    with pytest.raises(ValueError, match="md5"):
        data.setup()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"name": "cifar20"}, "name"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"normalize": "zscore"}, "normalize"),
        ({"batch_size": 0}, "batch_size"),
        ({"train_limit": 0}, "train_limit"),
    ],
)
def test_cifar_bad_arguments_are_named(tmp_path: Path, kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        CIFARDataModule(root=str(tmp_path), download=True, **kwargs)


# --- GLUE ---------------------------------------------------------------------------------------------------------
@needs_sst2
def test_glue_sst2_from_the_shared_files() -> None:
    data = GLUEDataModule("sst2", path=str(SST2), train_limit=64, val_limit=32, max_length=32, batch_size=16)
    assert (data.num_labels, data.metric) == (2, "acc")
    data.setup()
    assert data.train_set is not None and data.val_set is not None
    assert (len(data.train_set), len(data.val_set)) == (64, 32)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) >= TOKEN_FIELDS and batch["input_ids"].shape[0] == 16
    assert batch["input_ids"].shape[1] <= 32 and batch["input_ids"].shape == batch["attention_mask"].shape
    assert set(batch["labels"].tolist()) <= {0, 1}
    val = next(iter(data.val_dataloader()))
    assert val["labels"].shape == (32,)

    again = GLUEDataModule("sst2", path=str(SST2), train_limit=64, val_limit=32, max_length=32)
    again.setup()
    assert again.train_set is not None and again.train_set.labels == data.train_set.labels  # seeded subset


def test_glue_mrpc_in_its_original_layout(tmp_path: Path) -> None:
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"  # GLUE's MRPC files start with a byte-order mark
    rows = [
        "1\t702876\t702977\tAmrozi accused his brother .\tReferring to him , Amrozi accused his brother .",
        "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .",
        '1\t1330381\t1330521\tHe said "it is fine .\tHe said it was fine .',
    ]
    write(tmp_path / "train.tsv", [header, *rows])
    write(tmp_path / "dev.tsv", [header, rows[1]])
    data = GLUEDataModule("mrpc", path=str(tmp_path), batch_size=3)
    assert (data.num_labels, data.metric) == (2, "f1")
    data.setup()
    assert data.train_set is not None and data.train_set.labels == [1, 0, 1]
    batch = next(iter(torch.utils.data.DataLoader(data.train_set, batch_size=3, collate_fn=data.collate)))
    assert batch["token_type_ids"].max() == 1  # sentence pairs
    assert decode(data.train_set[2]["input_ids"]) == 'he said " it is fine. he said it was fine.'


def test_glue_cola_without_header(tmp_path: Path) -> None:
    rows = [
        "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
        "gj04\t0\t*\tThey drank the pub.",
        "clc95\t1\t\tThe sailors rode the breeze clear of the rocks.",
    ]
    write(tmp_path / "train.tsv", rows)
    write(tmp_path / "dev.tsv", rows[1:])
    data = GLUEDataModule("cola", path=str(tmp_path))
    assert (data.num_labels, data.metric) == (2, "mcc")
    data.setup()
    assert data.train_set is not None and data.val_set is not None
    assert data.train_set.labels == [1, 0, 1] and data.val_set.labels == [0, 1]
    assert decode(data.train_set[1]["input_ids"]) == "they drank the pub."


def test_glue_string_labels_and_mnli_dev_matched(tmp_path: Path) -> None:
    write(
        tmp_path / "qnli/train.tsv",
        ["index\tquestion\tsentence\tlabel", "0\tWho?\tHim.\tentailment", "1\tWhen?\tBlue.\tnot_entailment"],
    )
    write(tmp_path / "qnli/dev.tsv", ["index\tquestion\tsentence\tlabel", "0\tWhere?\tHere.\tentailment"])
    qnli = GLUEDataModule("qnli", path=str(tmp_path / "qnli"))
    qnli.setup()
    assert qnli.train_set is not None and qnli.train_set.labels == [0, 1]

    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label"
    write(
        tmp_path / "mnli/train.tsv",
        [
            header,
            "0\t1\t1e\tfiction\tA man sleeps.\tA man rests.\tentailment\tentailment",
            "1\t2\t2c\tfiction\tA dog runs.\tA cat runs.\tcontradiction\tcontradiction",
        ],
    )
    write(
        tmp_path / "mnli/dev_matched.tsv",
        [
            header,
            "0\t3\t3n\ttravel\tIt rains.\tIt is cold.\tneutral\tneutral",
            "1\t4\t4x\ttravel\tNo gold.\tLabel.\tneutral\t-",  # no gold label: skipped
        ],
    )
    mnli = GLUEDataModule("mnli", path=str(tmp_path / "mnli"))
    assert mnli.num_labels == 3
    mnli.setup()
    assert mnli.train_set is not None and mnli.train_set.labels == [0, 2]
    assert mnli.val_set is not None and mnli.val_set.labels == [1]


def test_glue_bad_label_names_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["sentence\tlabel", "fine\t1", "odd\tpositive"])
    write(tmp_path / "dev.tsv", ["sentence\tlabel", "fine\t1"])
    data = GLUEDataModule("sst2", path=str(tmp_path))
    with pytest.raises(ValueError, match=r"train\.tsv:3: label 'positive'"):
        data.setup()


def test_glue_errors_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="task"):
        GLUEDataModule("stsb", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="path"):
        GLUEDataModule("sst2", path=str(tmp_path / "missing"))
    write(tmp_path / "train.tsv", ["sentence\tlabel", "fine\t1"])
    with pytest.raises(FileNotFoundError, match=r"path.*dev\.tsv"):
        GLUEDataModule("sst2", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        GLUEDataModule("sst2", tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(ValueError, match="train_limit"):
        GLUEDataModule("sst2", train_limit=0)
    with pytest.raises(ValueError, match="max_length"):
        GLUEDataModule("sst2", max_length=1)


def test_glue_from_hugging_face_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed: a clear ImportError
    data = GLUEDataModule("mrpc")
    with pytest.raises(ImportError, match="pip install datasets"):
        data.setup()

    calls: list[tuple[str, str]] = []
    split = {"sentence1": ["a b", "c d", "e f"], "sentence2": ["a", "c", "x"], "label": [1, 1, 0], "idx": [0, 1, 2]}

    def load_dataset(name: str, config: str) -> dict[str, Any]:
        calls.append((name, config))
        return {"train": split, "validation": split, "test": split}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    data.setup()
    assert calls and set(calls) == {("glue", "mrpc")}
    assert data.train_set is not None and data.train_set.labels == [1, 1, 0]


# --- any labelled TSV ---------------------------------------------------------------------------------------------
def test_text_tsv_with_header_maps_labels_to_sorted_indices(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["id\ttext\tstars", "1\tgreat\t10", "2\tbad\t2", "3\tokay\t7", "4\tfine\t7"])
    write(tmp_path / "dev.tsv", ["id\ttext\tstars", "5\tmeh\t7", "6\tsuperb\t10"])
    data = TextTSVDataModule(str(tmp_path), text_column="text", label_column="stars", batch_size=2)
    assert data.num_labels == 3 and data.label_names == ["2", "7", "10"]  # numeric order, not "10" < "2"
    data.setup()
    assert data.train_set is not None and data.val_set is not None
    assert data.train_set.labels == [2, 0, 1, 1] and data.val_set.labels == [1, 2]
    batch = next(iter(data.train_dataloader()))
    assert set(batch) >= TOKEN_FIELDS and batch["labels"].shape == (2,)


def test_text_tsv_without_header_by_index_with_pairs_and_explicit_files(tmp_path: Path) -> None:
    train = write(tmp_path / "a.tsv", ["The cat sat.\tyes\tA cat sat.", "Rain.\tno\tSun."])
    val = write(tmp_path / "b.tsv", ["Dogs bark.\tno\tDogs sleep."])
    data = TextTSVDataModule(
        text_column=0, label_column=1, text_pair_column=-1, header=False, train_file=str(train), val_file=str(val)
    )
    assert data.label_names == ["no", "yes"]
    data.setup()
    assert data.train_set is not None and data.train_set.labels == [1, 0]
    assert decode(data.train_set[0]["input_ids"]) == "the cat sat. a cat sat."
    assert 1 in data.train_set[0]["token_type_ids"]


def test_text_tsv_quoted_fields(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["text\tlabel", '"he said ""hi""\tthen left"\tpos', "plain\tneg"])
    write(tmp_path / "dev.tsv", ["text\tlabel", "x\tpos"])
    data = TextTSVDataModule(str(tmp_path), quoted=True)
    data.setup()
    assert data.train_set is not None
    assert decode(data.train_set[0]["input_ids"]) == 'he said " hi " then left'


def test_text_tsv_errors_name_the_argument(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="path"):
        TextTSVDataModule(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="path"):
        TextTSVDataModule(str(tmp_path))  # no train.tsv
    with pytest.raises(ValueError, match="train_file"):
        TextTSVDataModule()
    write(tmp_path / "train.tsv", ["text\tlabel", "a\tx", "b\ty"])
    write(tmp_path / "dev.tsv", ["text\tlabel", "c\tz"])
    with pytest.raises(FileNotFoundError, match="val_file"):
        TextTSVDataModule(str(tmp_path), val_file="other.tsv")
    with pytest.raises(ValueError, match=r"label_column.*\['z'\]"):  # a validation label unseen in training
        TextTSVDataModule(str(tmp_path))
    write(tmp_path / "dev.tsv", ["text\tlabel", "c\tx"])
    with pytest.raises(ValueError, match="text_column"):
        TextTSVDataModule(str(tmp_path), text_column="sentence")
    with pytest.raises(ValueError, match="label_column"):
        TextTSVDataModule(str(tmp_path), label_column=5)
    with pytest.raises(ValueError, match="text_column"):
        TextTSVDataModule(str(tmp_path), text_column="text", header=False)
    with pytest.raises(ValueError, match="batch_size"):
        TextTSVDataModule(str(tmp_path), batch_size=0)


def test_padding_collate() -> None:
    collate = PaddingCollate(pad_token_id=7)
    batch = collate(
        [
            {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": 1},
            {"input_ids": [4], "attention_mask": [1], "labels": 0},
        ]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long


# --- label noise ---------------------------------------------------------------------------------------------------
def reference_label_noise(labels: list[int], fraction: float, num_classes: int, seed: int) -> list[int]:
    """Each label, where a uniform draw is below ``fraction``, shifted by a draw in 1..C-1 (mod C): a python loop."""
    rng = np.random.default_rng(seed)
    flips = rng.random(len(labels))
    shifts = rng.integers(1, num_classes, len(labels))
    return [(y + int(s)) % num_classes if f < fraction else y for y, f, s in zip(labels, flips, shifts, strict=True)]


@pytest.mark.parametrize(("fraction", "num_classes"), [(0.0, 3), (0.3, 2), (0.4, 10), (0.9, 5)])
def test_add_label_noise_matches_reference(fraction: float, num_classes: int) -> None:
    from lightning_slsam.data.label_noise import add_label_noise

    labels = [i % num_classes for i in range(200)]
    got = add_label_noise(torch.tensor(labels), fraction, num_classes, np.random.default_rng(7))
    assert got.tolist() == reference_label_noise(labels, fraction, num_classes, 7)
    changed = [a != b for a, b in zip(got.tolist(), labels, strict=True)]
    assert all(c == (f < fraction) for c, f in zip(changed, np.random.default_rng(7).random(200), strict=True))


def test_text_label_noise_is_seeded_train_only_and_another_class(tmp_path: Path) -> None:
    rows = ["text\tlabel", *(f"sentence number {i}\t{i % 3}" for i in range(60))]
    write(tmp_path / "train.tsv", rows)
    write(tmp_path / "dev.tsv", ["text\tlabel", "a\t0", "b\t1", "c\t2"])
    clean, noisy, again = (TextTSVDataModule(str(tmp_path), label_noise=n, seed=1) for n in (0.0, 0.5, 0.5))
    for data in (clean, noisy, again):
        data.setup()
    clean_labels, noisy_labels = clean.train_set.labels, noisy.train_set.labels  # type: ignore[union-attr]
    expected = reference_label_noise(clean_labels, 0.5, 3, 1 + 2)
    assert noisy_labels == expected and noisy_labels != clean_labels
    assert noisy_labels == again.train_set.labels  # type: ignore[union-attr]
    assert clean.val_set.labels == noisy.val_set.labels  # type: ignore[union-attr]
    with pytest.raises(ValueError, match=r"^label_noise:"):
        TextTSVDataModule(str(tmp_path), label_noise=1.0)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_download_offline_is_one_line_naming_the_dataset(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline, ``data.download=true`` fails with one line that names the dataset and the offline way, not with
    urllib's traceback (torchvision's fetch is made to fail as it does without a network)."""
    import urllib.error

    from torchvision import datasets

    def offline(*args: Any, **kwargs: Any) -> None:
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100, "__init__", offline)
    data = CIFARDataModule(name=name, root=str(tmp_path), download=True)
    with pytest.raises(ConnectionError) as info:
        data.prepare_data()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"download: fetching {name} into ") and "Temporary failure in name resolution" in message
    assert "data.download=false" in message
