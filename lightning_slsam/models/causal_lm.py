"""Causal-LM fine-tuning (the SL-SAM authors' Llama setting) on the sharpness-aware mixin.

:class:`CausalLM` wraps a Hugging Face ``AutoModelForCausalLM``: pretrained weights from a local folder
(``local_files_only=True``: nothing is downloaded), or a tiny random-init Llama built from a ``LlamaConfig`` in code
for tests and CPU demos, whose vocabulary is the byte-level tokenizer's (:mod:`lightning_slsam.models.byte_tokenizer`).
The loss is the next-token cross-entropy over the positions whose label is not -100 (the data module puts -100 on
prompt tokens and padding), averaged over those tokens.

Activation checkpointing (``activation_checkpointing=True``) is Hugging Face's per decoder layer with PyTorch's
non-reentrant checkpoint. It suits SL-SAM's sparse passes: a layer whose parameters are all inactive and whose input
needs no gradient (every arm below it inactive too) builds no graph, so it is not recomputed in the backward pass; a
layer with inactive parameters above an active one is recomputed only to carry the gradient down, as without
checkpointing; and the step's result is the same as without checkpointing (tests/test_causal_lm.py).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_slsam.lightning_adapter.mixin import SharpnessAwareMixin
from lightning_slsam.loading.optional_dependencies import import_optional
from lightning_slsam.models.byte_tokenizer import ByteTokenizer
from lightning_slsam.models.optimizer_config import (
    OptimizerFactory,
    SchedulerFactory,
    check_factories,
    configure_optimizer_and_scheduler,
)

#: labels with this value are not targets (PyTorch's and Hugging Face's ``ignore_index``)
IGNORE_INDEX = -100

__all__ = ["CausalLM", "enable_checkpointing", "next_token_loss", "tiny_llama_config"]


def next_token_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy of predicting ``labels[:, t + 1]`` from position ``t``, over the targets that are not -100.

    Args:
        logits: ``(batch, length, vocab)``; computed in float32 whatever their dtype.
        labels: ``(batch, length)`` int64 token ids, -100 where a position is not a target.
        reduction: ``"mean"`` (default: the mean over the targets, NaN if there are none) or ``"sum"``.
    """
    vocab = logits.shape[-1]
    shifted = logits[:, :-1, :].reshape(-1, vocab).float()
    targets = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def tiny_llama_config(
    vocab_size: int, layers: int = 2, hidden: int = 64, heads: int = 4, max_positions: int = 2048
) -> Any:
    """A ``LlamaConfig`` of the Llama-3.2 shape at toy size: grouped-query attention (half as many key/value heads
    as query heads), SwiGLU MLP of width 2 x ``hidden``, tied input and output embeddings (as Llama-3.2-1B/3B).

    Args:
        vocab_size: rows of the embedding (the tokenizer's ids).
        layers: decoder layers (default 2).
        hidden: model width (default 64); a multiple of ``heads``.
        heads: attention heads (default 4, even).
        max_positions: longest sequence, in tokens (default 2048, the recipe's ``max_length``).
    """
    transformers = import_optional("transformers", "CausalLM (tiny=True)")
    byte = ByteTokenizer()
    return transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=byte.bos_token_id,
        eos_token_id=byte.eos_token_id,
        pad_token_id=byte.pad_token_id,
        use_cache=False,
    )


def enable_checkpointing(model: Any) -> None:
    """Hugging Face's per-layer activation checkpointing with PyTorch's non-reentrant checkpoint, without the hook
    that makes the input embeddings' output require a gradient.

    Hugging Face adds that hook for the reentrant checkpoint (and adapters), which needs an input that requires a
    gradient; the non-reentrant one does not. Left on, every layer's input would require a gradient, so in a sparse
    pass layers below the lowest active arm would build a graph and be recomputed for nothing, and pass 2 could
    not reuse pass 1's prefix.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since gradient_checkpointing_enable was deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a Hugging Face causal LM (``model.model.layers`` for Llama, Mistral, Qwen, ...; the
    ``ModuleList`` with the most entries otherwise), in order."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"model: found no decoder layers (no nn.ModuleList) in {type(model).__name__} to shard")
    return list(max(lists, key=len))


def _check_positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argument}: must be an int >= 1, got {value!r}")
    return value


class CausalLM(SharpnessAwareMixin, pl.LightningModule):
    """Full fine-tuning of a causal language model on instruction batches (``input_ids``, ``attention_mask``,
    ``labels`` with -100 where a position is not a target, as :mod:`lightning_slsam.data.instruction` makes them).

    Args:
        model_name_or_path: a local folder with a Hugging Face causal LM (``config.json``, weights), loaded in
            float32 with ``local_files_only=True`` (the Trainer's ``precision`` decides the compute dtype:
            ``bf16-mixed`` keeps float32 weights and AdamW states). None (default) needs ``tiny=True``.
        tiny: build a tiny random-init Llama (:func:`tiny_llama_config`) for the byte-level tokenizer instead of
            loading weights (default False); the weights come from the global torch seed.
        tiny_layers: decoder layers of the tiny model (default 2).
        tiny_hidden: width of the tiny model (default 64).
        tiny_heads: attention heads of the tiny model (default 4; ``tiny_hidden`` must be a multiple).
        activation_checkpointing: recompute each decoder layer's activations in the backward pass instead of
            keeping them (Hugging Face's activation checkpointing with ``use_reentrant=False``, see
            :func:`enable_checkpointing`; default False).
        optimizer: a factory ``params -> Optimizer``; default AdamW with lr 1e-5, weight decay 0.01 (the authors').
        scheduler: an LR scheduler factory, or None (default) for a constant LR
            (see :mod:`lightning_slsam.models.optimizer_config`).
        scheduler_interval: ``"step"`` (default) or ``"epoch"`` (the authors' ``StepLR`` steps per epoch).
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` watches (default ``"val/loss"``).

    Logged each validation epoch, over the response tokens of the validation set: ``val/loss`` (nats per token),
    ``val/ppl`` (``exp`` of the loss) and ``val/token_acc`` (share of next tokens predicted exactly, in [0, 1]; higher
    is better, so it is the metric ``slsam-train`` keeps the best checkpoint by). Token-weighted on one device;
    under DDP ``val/loss`` and ``val/token_acc`` are the mean of the ranks' token-weighted means, ``val/ppl`` is
    exact over all ranks' tokens.

    Raises:
        FileNotFoundError: ``model_name_or_path`` is not a folder (the message names it and ``model.tiny=true``).
        ValueError: neither or both of ``model_name_or_path`` and ``tiny``, or a bad size (naming the argument).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        tiny: bool = False,
        tiny_layers: int = 2,
        tiny_hidden: int = 64,
        tiny_heads: int = 4,
        activation_checkpointing: bool = False,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        for name, flag in (("tiny", tiny), ("activation_checkpointing", activation_checkpointing)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name}: must be true or false, got {flag!r}")
        check_factories(optimizer, scheduler, scheduler_interval)
        transformers = import_optional("transformers", "CausalLM")
        if tiny:
            if model_name_or_path is not None:
                raise ValueError(
                    f"model_name_or_path: {str(model_name_or_path)!r} was given with tiny=true; pass one of them "
                    "(model_name_or_path=null for the tiny random-init Llama)"
                )
            layers = _check_positive_int(tiny_layers, "tiny_layers")
            hidden = _check_positive_int(tiny_hidden, "tiny_hidden")
            heads = _check_positive_int(tiny_heads, "tiny_heads")
            if hidden % heads or (heads % 2 and heads > 1) or (hidden // heads) % 2:
                raise ValueError(
                    f"tiny_heads: must be 1 or even and divide tiny_hidden={hidden} into even head widths "
                    f"(rotary embeddings), got {heads!r}"
                )
            config = tiny_llama_config(ByteTokenizer().vocab_size, layers, hidden, heads)
            self.model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            if model_name_or_path is None:
                raise ValueError(
                    "model_name_or_path: no model given; set it to a local folder with a Hugging Face causal LM "
                    "(e.g. Llama-3.2-3B-Instruct), or model.tiny=true for the tiny random-init Llama"
                )
            folder = Path(str(model_name_or_path)).expanduser()
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"model_name_or_path: {str(model_name_or_path)!r} is not a folder with a Hugging Face causal LM "
                    "(config.json and weights); pass an existing folder, or model.tiny=true for the tiny "
                    "random-init Llama"
                )
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, local_files_only=True
            )
        # no key/value cache in training; from_pretrained returns eval mode, and Lightning keeps submodules'
        # modes, so train mode here (dropout, and Hugging Face checkpoints layers in train mode only)
        self.model.config.use_cache = False
        self.model.train()
        if activation_checkpointing:
            enable_checkpointing(self.model)
        self.model_name_or_path = None if model_name_or_path is None else str(model_name_or_path)
        self.tiny = tiny
        self.activation_checkpointing = activation_checkpointing
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self._val_sums = torch.zeros(2, dtype=torch.float64)

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding: the ids the model can read."""
        return int(self.model.get_input_embeddings().weight.shape[0])

    def check_data(self, data: Any) -> None:
        """Refuse a data module whose tokenizer does not go with this model (``slsam-train`` calls it before
        training, ``setup`` again for any other caller). A data module without ``tokenizer_source`` passes.

        Raises:
            ValueError: starting with ``data.tokenizer:``: the byte-level tokenizer with pretrained weights, a
                pretrained tokenizer with the tiny model, or a tokenizer with more ids than the embedding has rows.
        """
        if not hasattr(data, "tokenizer_source"):
            return
        if self.tiny and data.tokenizer_source is not None:
            raise ValueError(
                f"data.tokenizer: {data.tokenizer_source!r} with model.tiny=true; the tiny model reads the byte-level "
                "tokenizer's ids (data.tokenizer=null)"
            )
        if not self.tiny and data.tokenizer_source is None:
            raise ValueError(
                "data.tokenizer: null (the byte-level tokenizer of the tiny model) with pretrained weights; set it to "
                f"the model's folder ({self.model_name_or_path!r})"
            )
        if data.vocab_size > self.vocab_size:
            raise ValueError(
                f"data.tokenizer: its {data.vocab_size} ids exceed the model's {self.vocab_size} embedding rows; "
                "use the tokenizer saved with the model"
            )

    def setup(self, stage: str) -> None:
        """:meth:`check_data` on the Trainer's data module, before any training."""
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is not None:
            self.check_data(data)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (``trainer=fsdp2``): shard with FSDP2, one unit per decoder
        layer and the Hugging Face model as the root (embeddings, final norm and head), over the data-parallel
        mesh. On any other strategy the model is left as it is. Idempotent (Lightning may call it again)."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        data_parallel = mesh["data_parallel"]
        for layer in decoder_layers(self.model):
            fully_shard(layer, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits ``(batch, length, vocab)`` of ``input_ids`` (``attention_mask``: 1 on real tokens, 0 on padding)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        for key in ("input_ids", "labels"):
            if key not in batch:
                raise KeyError(f"batch: a CausalLM batch needs {key!r}, got keys {sorted(batch)}")
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        return next_token_loss(logits, batch["labels"])

    def on_validation_epoch_start(self) -> None:
        # summed over the epoch's response tokens: cross-entropy (nats) and token count, for the perplexity
        self._val_sums = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        labels = batch["labels"][:, 1:]
        targets = labels != IGNORE_INDEX
        count = int(targets.sum())
        if count == 0:
            return
        loss_sum = next_token_loss(logits, batch["labels"], reduction="sum")
        correct = ((logits[:, :-1, :].argmax(dim=-1) == labels) & targets).sum()
        self._val_sums = self._val_sums + torch.stack([loss_sum.detach().double(), targets.sum().double()])
        # logged here (not at the epoch's end) so that callbacks see the epoch's values at on_validation_epoch_end;
        # weighted by the batch's target tokens, Lightning's epoch mean is the mean over all tokens of the epoch
        self.log("val/loss", loss_sum / count, prog_bar=True, batch_size=count, sync_dist=True)
        self.log("val/token_acc", correct.float() / count, prog_bar=True, batch_size=count, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")  # over DDP ranks
        loss_sum, count = (float(v) for v in sums)
        if count > 0:
            loss = loss_sum / count
            self.log("val/ppl", math.exp(min(loss, math.log(torch.finfo(torch.float32).max))))

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        return configure_optimizer_and_scheduler(
            self,
            self.optimizer_factory,
            functools.partial(torch.optim.AdamW, lr=1e-5, weight_decay=0.01),
            self.scheduler_factory,
            self.scheduler_interval,
            self.scheduler_monitor,
        )
