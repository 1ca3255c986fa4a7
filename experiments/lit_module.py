"""The LightningModule: next-token loss, perplexity and bits per byte on every evaluation split; AdamW with
linear warmup and cosine decay; per-parameter optimiser settings declared by the mixers."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torchmetrics import SumMetric

from arch_zoo import FFNConfig, LanguageModel, ModelConfig, make_config
from arch_zoo.contract import MixerConfig

IGNORE = -100  # target value of positions that are not scored


def metric_prefix(split: str) -> str:
    """Metric namespace of an evaluation split: ``val`` -> ``val``, ``ood_pydoc`` -> ``ood/pydoc``."""
    head, _, tail = split.partition("_")
    return f"{head}/{tail}" if tail and head in ("ood", "slice") else split


def logging_step(trainer: Any) -> bool:
    """Whether the trainer's step is one it logs at: where a read of the loss on the host costs no extra wait for the
    GPU, since Lightning reads the logged values then."""
    return trainer.global_step % max(1, trainer.log_every_n_steps) == 0


class DivergedError(RuntimeError):
    """The loss became NaN or infinite: the run stops and is marked FAILED with this reason."""


SCHEDULES = ("cosine", "linear")


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # after the warmup: cosine or linear decay to min_lr_ratio * lr at trainer.max_steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8


def validation_metrics(trainer: Any, eval_splits: list[str]) -> dict[str, float]:
    """The last validation's metrics (``val/*``, ``ood/*``, ``val_len*/*``) as numbers: they reach the trainer's
    callback metrics, not the list ``Trainer.validate`` returns, since they are logged to the logger directly."""
    prefixes = tuple(f"{metric_prefix(split)}/" for split in eval_splits)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes)}


def lr_multiplier(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Linear warmup to 1, then cosine or linear decay to ``min_ratio`` at ``total`` steps (the RetNet paper decays
    linearly: fairseq's polynomial schedule at power 1)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return min_ratio + (1 - min_ratio) * (1 - progress)
    if schedule != "cosine":
        raise ValueError(f"optim.schedule={schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """Decay matrices only (not norms, biases, embeddings' 1-D friends); honour ``param._optim`` overrides.

    ``lr_scale`` and ``lr_max`` are relative to the run's ``lr`` (see ``arch_zoo.contract.set_optim``) and become a
    group's own peak rate; the schedule then scales every group alike."""
    grouped: dict[tuple, list[torch.nn.Parameter]] = {}
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        settings = {"weight_decay": weight_decay if param.ndim >= 2 else 0.0}
        custom = dict(getattr(param, "_optim", {}))
        scale, cap = custom.pop("lr_scale", None), custom.pop("lr_max", None)
        if (scale is not None or cap is not None) and lr is None:
            raise ValueError("parameter_groups: relative learning rates (lr_scale, lr_max) need the run's lr")
        if scale is not None:
            settings["lr"] = lr * scale
        if cap is not None:
            settings["lr"] = min(settings.get("lr", lr), cap)
        settings.update(custom)
        grouped.setdefault(tuple(sorted(settings.items())), []).append(param)
    groups = [{"params": params, **dict(key)} for key, params in grouped.items()]
    for group in groups:
        group["name"] = group_name(group, weight_decay, lr)
    return groups


def fused_adamw(device: torch.device, precision: str) -> bool:
    """Whether AdamW runs as one fused kernel: on CUDA (one launch for every parameter, where the default loops over
    them in a few), except under float16 with a loss scaler, whose fused step unscales the gradients itself and so
    cannot be clipped by Lightning first."""
    return device.type == "cuda" and str(precision) != "16-mixed"


def group_name(group: dict, weight_decay: float, lr: float | None) -> str:
    """What sets a group apart, as the learning-rate monitor's metric name (``lr-AdamW/no_decay-lr_x2``, not
    ``pg3``): decayed or not, and its own peak rate (as a multiple of the run's) or weight decay where it has one."""
    decay = group["weight_decay"]
    name = "no_decay" if decay == 0 else "decay" if decay == weight_decay else f"decay_{decay:g}"
    if "lr" in group:
        name += f"-lr_x{group['lr'] / lr:.3g}" if lr else f"-lr_{group['lr']:g}"
    return name


def typed_model_config(values: ModelConfig | dict[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` from itself or from its plain-dict form (how a checkpoint keeps it: a checkpoint holds no
    classes, so it loads with ``weights_only``)."""
    if isinstance(values, ModelConfig):
        return values
    values = dict(values)
    values["ffn"] = (
        FFNConfig(**values["ffn"]) if isinstance(values.get("ffn"), dict) else values.get("ffn", FFNConfig())
    )
    for key in ("mixer", "hybrid_mixer"):
        if values.get(key) is not None:
            values[key] = make_config(values[key])
    return ModelConfig(**values)


class LanguageModelTask(L.LightningModule):
    """The training task. Its constructor arguments are saved in the checkpoint as plain values, so
    ``LanguageModelTask.load_from_checkpoint(path)`` rebuilds it with the trained weights. ``layer_mixers``, what
    ``model_config.check()`` returned when the caller checked it already (:class:`LanguageModel`), is not saved: a
    task rebuilt from a checkpoint checks its config."""

    def __init__(
        self,
        model_config: ModelConfig | dict[str, Any],
        optim: OptimConfig | dict[str, Any],
        total_steps: int,
        eval_splits: list[str],
        bytes_per_token: dict[str, float | None],
        layer_mixers: tuple[MixerConfig, MixerConfig | None] | None = None,
    ) -> None:
        super().__init__()
        model_config = typed_model_config(model_config)
        optim = optim if isinstance(optim, OptimConfig) else OptimConfig(**optim)
        plain = {
            "model_config": dataclasses.asdict(model_config),
            "optim": dataclasses.asdict(optim),
            "total_steps": total_steps,
            "eval_splits": list(eval_splits),
            "bytes_per_token": dict(bytes_per_token),
        }
        self.save_hyperparameters(plain, logger=False)  # the run logs its whole config as params already
        self.model = LanguageModel(model_config, layer_mixers)
        self.optim = optim
        self.total_steps = total_steps
        self.eval_splits = eval_splits
        self.bytes_per_token = bytes_per_token
        self._unchecked_losses: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last finiteness check
        self._checked_at = -1  # the logging step whose losses were checked
        self.nats = torch.nn.ModuleList(SumMetric() for _ in eval_splits)
        self.correct = torch.nn.ModuleList(SumMetric() for _ in eval_splits)
        self.count = torch.nn.ModuleList(SumMetric() for _ in eval_splits)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)[0]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A compiled run saved its weights under ``model._orig_mod.``; an uncompiled model reads them too."""
        if isinstance(self.model, LanguageModel):
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("model._orig_mod.")]:
                state["model." + key.removeprefix("model._orig_mod.")] = state.pop(key)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = self.model.loss(inputs, targets)
        self._unchecked_losses.append((self.global_step, loss.detach()))  # checked at the next logging step
        # synced: under DDP the logged loss is the global batch's, comparable with one device at the same batch. Not
        # prog_bar: Lightning turns progress-bar values into numbers after every batch, a wait for the GPU each step;
        # the run's progress bar reads the loss on logging steps instead (callbacks.StepProgressBar)
        self.log("train/loss", loss, on_step=True, on_epoch=False, sync_dist=True)
        return loss

    def check_losses_finite(self) -> None:
        """Raise :class:`DivergedError` naming the first NaN or infinite training loss since the last check.

        Why not at every step: reading a loss on the host waits for the GPU to finish the step, so the host cannot
        queue the next step's kernels while this one runs. The losses are read together, once per logging step
        (when Lightning reads the logged loss anyway), before a checkpoint is written (no diverged weights are
        saved to resume from), before a validation and at the end of training (before the final validation and the
        logged model), so a diverged run still fails with its first bad step, a few steps later at most."""
        if not self._unchecked_losses:
            return
        steps, losses = zip(*self._unchecked_losses, strict=True)
        self._unchecked_losses = []
        for step, value in zip(steps, torch.stack(losses).float().tolist(), strict=True):
            if not math.isfinite(value):
                raise DivergedError(f"training loss is {value} at step {step}")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.trainer.global_step
        # once a logging step, not once a micro-batch of it (gradient accumulation keeps the step for several)
        if logging_step(self.trainer) and step != self._checked_at:
            self._checked_at = step
            self.check_losses_finite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_losses_finite()

    def on_validation_start(self) -> None:
        self.check_losses_finite()

    def on_train_end(self) -> None:
        self.check_losses_finite()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0):
        inputs, targets = batch
        limit = self.model.max_length
        if limit is not None and inputs.shape[1] > limit:
            return  # a split longer than a mixer is defined on (Hyena past l_max): left unevaluated, not failed
        logits, _ = self.model(inputs)
        logits, targets = logits.flatten(0, 1).float(), targets.flatten()
        nats = torch.nn.functional.cross_entropy(logits, targets, reduction="sum", ignore_index=IGNORE)
        scored = targets != IGNORE  # synthetic tasks score only their answer positions
        self.nats[dataloader_idx].update(nats)
        self.correct[dataloader_idx].update((logits.argmax(-1)[scored] == targets[scored]).sum().float())
        self.count[dataloader_idx].update(scored.sum().float())

    def on_validation_epoch_end(self) -> None:
        values: dict[str, torch.Tensor] = {}
        for i, split in enumerate(self.eval_splits):
            count = self.count[i].compute()
            if count == 0:  # sanity check or a split that was not evaluated
                continue
            loss = self.nats[i].compute() / count
            prefix = metric_prefix(split)
            values[f"{prefix}/loss"] = loss
            values[f"{prefix}/ppl"] = torch.exp(loss)
            values[f"{prefix}/acc"] = self.correct[i].compute() / count
            if self.bytes_per_token.get(split):
                values[f"{prefix}/bpb"] = loss / math.log(2) / self.bytes_per_token[split]
            for metric in (self.nats[i], self.correct[i], self.count[i]):
                metric.reset()
        # for callbacks (checkpoints, a sweeper's pruning) through Lightning; to the logger at the optimiser step the
        # weights have taken, which Lightning would record one lower inside the fit than after it
        for key, value in values.items():
            self.log(key, value, add_dataloader_idx=False, prog_bar=key == "val/loss", logger=False)
        if self.logger is not None and values and not self.trainer.sanity_checking:
            self.logger.log_metrics({k: float(v) for k, v in values.items()}, step=self.global_step)
        if not self.trainer.sanity_checking:
            self.validated_at_step = self.global_step  # the final validation reuses a pass at the last step

    def configure_optimizers(self):
        o = self.optim
        groups = parameter_groups(self.model, o.weight_decay, o.lr)
        fused = fused_adamw(next(self.model.parameters()).device, self.trainer.precision)
        # None, not False, off CUDA: an explicit False would also turn off torch's default multi-tensor loop
        optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused or None)
        # a group's own "lr" is kept as its peak; the schedule scales every group alike
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, o.warmup_steps, self.total_steps, o.min_lr_ratio, o.schedule)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm=None
    ) -> None:
        """Under FSDP a gradient's norm spans the shards, so only the sharded module can clip by it (Lightning's FSDP
        precision plugin refuses norm clipping). Under bf16-mixed the fused AdamW's gradients are clipped as they
        stand: Lightning's mixed-precision plugin refuses to clip for any optimizer that unscales inside its step,
        but bf16 has no loss scale, so there is nothing to unscale. Everything else clips as Lightning does."""
        from lightning.pytorch.plugins.precision import MixedPrecision, Precision
        from lightning.pytorch.strategies import FSDPStrategy
        from lightning.pytorch.utilities import GradClipAlgorithmType

        plugin, by_norm = self.trainer.precision_plugin, gradient_clip_algorithm in (None, "norm")
        if gradient_clip_val and by_norm and isinstance(self.trainer.strategy, FSDPStrategy):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
        elif gradient_clip_val and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or "norm")
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
