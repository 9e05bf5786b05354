"""transformers' ``Trainer`` for a model with lorafit adapters: checkpoints hold the adapters, not the model.

    from lorafit.train.hf_trainer import AdapterTrainer
    lorafit.attach(model, lorafit.LoraConfig(r=16, target_modules="all-linear"))
    trainer = AdapterTrainer(model=model, args=transformers.TrainingArguments(...), train_dataset=...)
    trainer.train()                      # or trainer.train(resume_from_checkpoint=True)

``Trainer`` writes a model that is not a PEFT model with ``save_pretrained``: every checkpoint would hold the
whole base model (14 GB for a 7B model in bf16) under lorafit's wrapper names, which no plain model loads.
``AdapterTrainer`` writes each checkpoint and ``save_model`` as PEFT's adapter files (``save_adapter``: the
adapter named ``default`` in the directory itself, any other in a subdirectory of its name, as PEFT does), and
reads them back in place (``hotswap_adapter``, which checks every tensor) to resume a run and for
``load_best_model_at_end``. Optimizer, scheduler and random states are the Trainer's own. ``AdapterCheckpoints``
does the same for a subclass of ``Trainer`` (TRL's ``SFTTrainer``, your own). A model that
transformers loaded in 4 or 8 bits (bitsandbytes) trains too: QLoRA, which the plain ``Trainer`` refuses for
a model that is not a PEFT model. ``loraplus_lr_ratio=16`` trains with LoRA+ (``lorafit.optimizer_groups``),
``lorafa=True`` with LoRA-FA (``lorafit.lorafa``: the active adapters' A frozen, B's gradients projected).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from lorafit.hotswap import hotswap_adapter
from lorafit.io import CONFIG_NAME, save_adapter
from lorafit.lorafa import LoraFAProjection
from lorafit.model import active_adapters, adapter_configs
from lorafit.optimizer_groups import optimizer_groups


class AdapterCheckpoints:
    """What makes a ``transformers.Trainer`` (or a subclass, such as TRL's ``SFTTrainer``) save and load the
    model's lorafit adapters instead of the model (module docstring); put it first among the bases:
    ``class SFTAdapterTrainer(AdapterCheckpoints, trl.SFTTrainer): pass``."""

    def __init__(self, model: torch.nn.Module | None = None, *args, loraplus_lr_ratio: float = 1.0,
                 loraplus_lr_embedding: float = 1e-6, lorafa: bool = False, **kwargs) -> None:
        self.loraplus = (loraplus_lr_ratio, loraplus_lr_embedding)
        if lorafa and loraplus_lr_ratio != 1:
            raise ValueError("lorafa=True freezes A, so LoRA+'s ratio of B's rate to A's means nothing; leave "
                             "loraplus_lr_ratio at 1")
        if lorafa and not isinstance(model, torch.nn.Module):
            raise ValueError("lorafa=True freezes the A factors of the model's adapters: pass model= (with them)")
        self.lorafa = LoraFAProjection(model, active_adapters(model)) if lorafa else None
        self._projecting = None  # the projection's hook on the optimizer, once there is one
        if self.lorafa is not None:
            self.lorafa.freeze_a()  # before Trainer (and DDP or FSDP under it) sees what trains
        # Trainer refuses a model loaded in 4 or 8 bits unless adapters are attached, which it can only see on a
        # PEFT model (the flag transformers' own PEFT integration sets). Lorafit's adapters satisfy what the check
        # is for, so the flag is set while Trainer checks, and only for a quantized model with adapters.
        vouch = (isinstance(model, torch.nn.Module) and getattr(model, "is_quantized", False)
                 and bool(adapter_configs(model)) and not getattr(model, "_hf_peft_config_loaded", False))
        if vouch:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            if vouch:
                del model._hf_peft_config_loaded

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """With ``loraplus_lr_ratio`` other than 1, the optimizer the arguments name (AdamW by default, with
        their betas and eps) over ``lorafit.optimizer_groups``: B at ``learning_rate * loraplus_lr_ratio``. With
        ``lorafa``, B's gradients are projected before each of its steps."""
        if self.optimizer is not None or self.loraplus[0] == 1:
            super().create_optimizer(model) if model is not None else super().create_optimizer()
        else:
            model = self.model if model is None else model
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = optimizer_groups(model, self.args.learning_rate, self.args.weight_decay, *self.loraplus)
            self.optimizer = optimizer_cls(groups, **kwargs)
        if self.lorafa is not None and self._projecting is None:
            self._projecting = self.lorafa.register(self.optimizer)
        return self.optimizer

    def _adapters(self) -> tuple[torch.nn.Module, list[str]]:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        names = list(adapter_configs(model))
        if not names:
            raise ValueError("AdapterTrainer: the model has no lorafit adapter to save (lorafit.attach one first, "
                             "or use transformers.Trainer for full fine-tuning)")
        return model, names

    @staticmethod
    def _directory(root: str | os.PathLike, name: str) -> Path:
        return Path(root) if name == "default" else Path(root) / name

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)  # adapters other than "default" go to its subdirectories
        model, names = self._adapters()
        for name in names:
            save_adapter(model, self._directory(output_dir, name), name)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_adapters(self, checkpoint: str | os.PathLike) -> bool:
        """The checkpoint's adapters into the model's; False when it holds none (a plain Trainer's checkpoint)."""
        model, names = self._adapters()
        found = [name for name in names if (self._directory(checkpoint, name) / CONFIG_NAME).is_file()]
        if not found:
            return False
        missing = sorted(set(names) - set(found))
        if missing:
            raise ValueError(f"checkpoint {checkpoint} holds no files for adapters {missing} of this model")
        for name in found:
            hotswap_adapter(model, self._directory(checkpoint, name), name)
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        if not self._load_adapters(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_adapters(self.state.best_model_checkpoint):
            super()._load_best_model()


class AdapterTrainer(AdapterCheckpoints, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints are the model's lorafit adapters (module docstring)."""
