"""The run config: one TOML file with [model], [data], [task], [lora] and [train] sections.

    output_dir = "runs/sst2"
    [model]  name = "minilm"
    [data]   train = "${LORAFIT_DATA}/sst2/train.jsonl"   validation = "..."
    [task]   type = "classification"   max_length = 64
    [lora]   r = 8   lora_alpha = 16   target_modules = ["query", "key", "value", "dense"]
    [train]  epochs = 3   lr = 5e-4   batch_size = 32

Every key can be overridden with ``key=value`` strings (``train.lr=1e-4``); a
value is read as a TOML value, and as a plain string if it is not one. From
Python the same config may be a dict with the file's shape
(``{"model": {"name": "minilm"}, "train": {"lr": 1e-4}}``), checked the same way.
Unknown keys are errors that suggest the closest known key. The [lora] section
holds ``lorafit.LoraConfig`` fields and is validated by LoraConfig itself.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafit.config import LoraConfig

CONFIG_FILE = "config.toml"  # a run directory's copy of its config: what makes a directory a lorafit run
TASKS = ("classification", "causal_lm", "seq2seq", "preference", "reward", "kto", "grpo")
GRPO_LOSSES = ("grpo", "dr_grpo", "bnpo", "dapo", "cispo", "sapo", "luspo")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
PAIR_TASKS = ("preference", "reward")  # rows of a prompt and two responses, one preferred
# PEFT's task_type for each task.type: written to adapter_config.json (AutoPeftModel picks the model class by
# it), and SEQ_CLS makes lorafit.attach train and save the new classification head with the adapter.
LORA_TASK_TYPES = {"classification": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM",
                   "preference": "CAUSAL_LM", "reward": "SEQ_CLS", "kto": "CAUSAL_LM", "grpo": "CAUSAL_LM"}
METHODS = ("lora", "full")
PREFERENCE_LOSSES = ("dpo", "ipo", "hinge", "simpo", "orpo")
REFERENCE_FREE_LOSSES = ("simpo", "orpo")  # they score responses without a reference model
SCHEDULERS = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")
FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet")
DISTRIBUTED = ("ddp", "fsdp")
MODEL_DROPOUTS = ("torch", "hashed")
MASTER_WEIGHTS = ("auto", "on", "off")
QUANTIZE_BITS = (0, 4, 8)


@dataclass
class ModelSection:
    name: str = ""  # "minilm", "smollm2-135m", a local Hugging Face directory, or a hub name when online
    dtype: str = "float32"  # the base weights' dtype; "auto" keeps the checkpoint's
    device: str = "auto"  # "auto": cuda when available, else cpu
    quantize: int = 0  # 0: none; 4: NF4, 8: int8 frozen base linear layers (QLoRA; train.method "lora" only)


@dataclass
class DataSection:
    # a file (.jsonl, .json, .csv, .tsv, .parquet) or a Hugging Face hub data set "owner/name" (its split named
    # like the setting: train / validation / test; "owner/name:split" picks another), read when online
    train: str = ""
    validation: str | None = None
    test: str | None = None
    validation_fraction: float = 0.0  # held out of train when no validation file is given
    format: str = "auto"  # from the file extension: .jsonl, .json, .csv, .tsv, .parquet
    # Where the Arrow copies of the files and the tokenized rows are kept between runs (a changed file,
    # tokenizer, max_length or field mapping is tokenized again); default $HF_DATASETS_CACHE, else
    # ~/.cache/lorafit/datasets
    cache_dir: str | None = None
    # Read the training rows as the run goes instead of converting and tokenizing them first: for data larger
    # than memory or disk. Needs train.max_steps (the rows are not counted), data.labels for classification,
    # and a validation file (not validation_fraction); not with task.packing. Rows are shuffled in a buffer of
    # shuffle_buffer rows, and grouped by length within each 50 batches.
    streaming: bool = False
    shuffle_buffer: int = 10_000
    # classification
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    labels: list | None = None  # the label set, in order; default: the sorted labels found in train
    # generation: instruction (+ optional input) -> output, or a chat `messages` list
    instruction_field: str | None = None
    input_field: str | None = None
    output_field: str | None = None
    messages_field: str | None = None
    instruction: str | None = None  # a fixed instruction put before every example (e.g. "Summarize:")
    # preference (DPO): the prompt as for generation (instruction / input fields), and two responses to it, each
    # a text or a list of chat messages (without a prompt field, whole conversations)
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    margin_field: str | None = None  # reward: how far each pair's chosen score must lead (Llama 2's margin loss)
    # evaluation of generation: ROUGE against each of these fields (the best one per row); a validation or
    # test row without output_field takes the first as its target (e.g. DialogSum's summary1..summary3)
    reference_fields: list[str] | None = None
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    max_test_rows: int | None = None


@dataclass
class TaskSection:
    type: str = "classification"
    max_length: int = 128  # tokens per example (the prompt+response, or the source for seq2seq)
    max_target_length: int = 128  # seq2seq targets
    max_new_tokens: int = 64  # generation during evaluation
    generate_rows: int = 0  # evaluate ROUGE on generations for this many eval rows (0: loss/perplexity only)
    packing: bool = False  # causal_lm: training examples packed into sequences of up to max_length tokens
    # preference: the loss (PREFERENCE_LOSSES; train/preference.py has their formulas), its beta (DPO's: how far
    # from the reference model the rewards let the adapter go; SimPO's paper uses about 2), SimPO's target margin,
    # and the weight of an added NLL of the chosen responses (RPO)
    preference_loss: str = "dpo"
    dpo_beta: float = 0.1
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0
    # dpo, simpo: the share of pairs taken to be labelled the wrong way round (conservative DPO): the loss of each
    # pair is then (1 - label_smoothing) of its own plus label_smoothing of the swapped pair's
    label_smoothing: float = 0.0
    reward_centering: float = 0.0  # reward: weight of (chosen score + rejected score)^2, keeping scores near 0
    # kto (its beta is dpo_beta): the weights of the desirable and the undesirable completions' losses
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0
    # preference and kto: the reference model's log-probabilities of every example computed once, before the first
    # step (one forward fewer per step; full fine-tuning needs them, having no base to switch back to)
    precompute_reference: bool = False
    # preference and kto: a prompt longer than this many tokens keeps its end (the turns nearest the response), so
    # that max_length leaves room for the responses; None: prompts are cut only by max_length, from the end
    max_prompt_length: int | None = None
    # grpo: completions sampled per prompt (a group), their temperature (the log-probabilities the loss uses are
    # the tempered ones, as TRL's), nucleus, top-k and min-p sampling and transformers' repetition penalty (1.0, 0,
    # 0.0 and 1.0: off; the loss does not correct for them, as TRL's does not), and the weight of the KL estimate
    # against the base model (0: no reference model runs)
    num_generations: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    grpo_beta: float = 0.0
    # grpo: how the token losses add up (train/grpo.py): "grpo" averages each completion's tokens (the paper);
    # "dr_grpo" divides every completion's token sum by task.max_new_tokens (Dr. GRPO); "bnpo" averages the tokens
    # of each micro-batch; "dapo" the tokens of the whole step (DAPO; TRL's default). scale_rewards divides the
    # advantages by the standard deviation of each group's rewards ("group" or true), of the step's ("batch"), or
    # not at all ("none" or false, as Dr. GRPO recommends)
    # "cispo" (MiniMax-M1) weighs each token's policy gradient by its ratio capped at 1 + grpo_epsilon_high,
    # without gradient, summed as "dapo"; "sapo" replaces the clip by a sigmoid gate of temperature
    # sapo_temperature_pos (positive advantages) or sapo_temperature_neg, averaged as "grpo"; "luspo" sums each
    # completion's clipped token losses and averages the completions (length-unbiased GSPO)
    grpo_loss: str = "grpo"
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    scale_rewards: bool | str = True
    # grpo: steps taken on each batch of samples (PPO's epochs, the paper's mu); the ratio of the policy to the one
    # that sampled is clipped to [1 - grpo_epsilon, 1 + grpo_epsilon_high] (DAPO's clip-higher: 0.28; None: the
    # same as grpo_epsilon), per token or, with importance_sampling_level = "sequence", per completion (GSPO)
    num_iterations: int = 1
    grpo_epsilon: float = 0.2
    grpo_epsilon_high: float | None = None
    importance_sampling_level: str = "token"
    # grpo: INTELLECT-2's two-sided clip: the ratio is also capped at grpo_delta (> 1 + grpo_epsilon_high), which
    # bounds the loss where the advantage is negative (None: off); top_entropy_quantile keeps the policy term on
    # that top share of each micro-batch's completion tokens by entropy (every process's; Wang et al., 2025,
    # "Beyond the 80/20 rule": 0.2), the KL term on all of them (1.0: every token)
    grpo_delta: float | None = None
    top_entropy_quantile: float = 1.0
    # grpo: an entropy bonus: -entropy_coef x the entropy of each completion token's distribution joins its policy
    # term (on the tokens top_entropy_quantile keeps), added up as the loss is; it holds a policy back from
    # collapsing onto one answer (0: off)
    entropy_coef: float = 0.0
    # grpo: completions that reach task.max_new_tokens without ending carry no loss (DAPO's overlong filtering)
    mask_truncated_completions: bool = False
    # grpo: the most completions one generation samples (0: all of a step's, every micro-batch's, in one); a
    # smaller number holds fewer KV caches at once, for a large grad_accum, at the cost of more generations
    generation_batch_size: int = 0
    # grpo: every training completion a line of the run's completions.jsonl (its step, prompt, text, rewards,
    # advantage, and what reward functions logged with log_extra), and every completion the evaluations during
    # training sample, to read what the policy learns to write
    log_completions: bool = False
    # grpo: what scores a completion (lorafit.train.rewards): a lorafit reward run, or a classification run with the
    # class whose probability is the reward, or a transformers sequence-classification model (a reward model, or a
    # classifier with that class); and/or Python functions "path/to/file.py:name" (one or a list); the
    # reward is their sum, or weighted by reward_weights (one per reward: the run first, then the functions)
    reward_model: str | None = None
    reward_label: str | None = None
    reward_function: str | list[str] | None = None
    reward_weights: list[float] | None = None

    def reward_functions(self) -> list[str]:
        """task.reward_function as a list (it may name one function or several)."""
        f = self.reward_function
        return [f] if isinstance(f, str) else list(f or [])

    def reward_scaling(self) -> str:
        """task.scale_rewards as one of SCALE_REWARDS (true is "group", false "none")."""
        return {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)


@dataclass
class TrainSection:
    method: str = "lora"
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps (overrides epochs)
    batch_size: int = 16
    eval_batch_size: int = 64  # rows per evaluation batch (at most) and per generation batch
    eval_batch_tokens: int = 8192  # padded tokens (rows x longest row) per evaluation batch, at most
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0  # never applied to biases and norm weights
    loraplus_lr_ratio: float = 1.0  # LoRA+: the adapters' B factors train at lr times this (the paper: about 16)
    loraplus_lr_embedding: float = 1e-6  # LoRA+: an embedding's adapter trains at this rate
    lorafa: bool = False  # LoRA-FA: A stays frozen, B's gradient is projected (less activation memory)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end of every epoch
    save_every: int = 0  # optimizer steps between checkpoints; 0: whenever it evaluates
    keep_best: bool = True  # the final adapter is the best evaluated one, not the last
    metric: str = ""  # what "best" means; default: accuracy (classification) or eval_loss
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement (0: never)
    seed: int = 0
    # "auto": LoRA's 16-bit trained parameters step on float32 copies (lorafit.train.master_weights); full
    # fine-tuning's do not (the copies would cost 12 bytes per weight); "on" / "off" for both methods
    master_weights: str = "auto"
    bf16: bool = False  # bfloat16 autocast for forward and loss; LoRA on 16-bit weights then trains float32 adapters
    # float16 autocast with loss scaling (GPUs without bfloat16); on by itself for float16 weights under LoRA
    fp16: bool = False
    gradient_checkpointing: bool = False
    # torch.compile each transformer block (model._no_split_modules) with compile_backend; see docs/TRAINING.md
    compile: bool = False
    compile_backend: str = "inductor"
    # "hashed": the model's nn.Dropout modules draw lorafit's hashed masks (faster on a CPU, a different
    # random stream), see lorafit.layers.hashed_dropout
    model_dropout: str = "torch"
    # causal_lm, seq2seq: NEFTune's noise on the input embeddings while training, of size alpha / sqrt(length x
    # width) (the paper and TRL use 5 to 15); 0: off. See lorafit.train.neftune
    neftune_noise_alpha: float = 0.0
    group_by_length: bool = True
    log_every: int = 10
    tensorboard: bool = False
    num_threads: int = 0  # CPU threads for torch (0: torch's default)
    # TensorFloat-32 for float32 matrix products and convolutions on CUDA GPUs (Ampere and newer), for this
    # process, as torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32; false leaves them as
    # they are (torch's own default: off for products)
    tf32: bool = False
    keep_freed_memory: bool = True  # glibc: reuse freed memory across steps, see lorafit.train.allocator
    distributed: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (the frozen base sharded)


@dataclass
class RunConfig:
    output_dir: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    task: TaskSection = field(default_factory=TaskSection)
    lora: dict[str, Any] = field(default_factory=dict)
    train: TrainSection = field(default_factory=TrainSection)

    # -- building ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config", *, validate: bool = True) -> RunConfig:
        """The config a TOML file's tables describe: sections as nested dicts (``{"train": {"lr": 1e-4}}``)
        or dotted keys (``{"train.lr": 1e-4}``), checked like a file."""
        config = cls()
        for key, value in data.items():
            if not isinstance(key, str):
                raise TypeError(f"{source}: keys must be strings (section or setting names), got {key!r}")
            if key in _SECTIONS:
                if not isinstance(value, dict):
                    raise ValueError(f"{source}: [{key}] must be a table of settings, got {value!r}")
                for sub, sub_value in value.items():
                    config.set(f"{key}.{sub}", sub_value, source=source)
            elif isinstance(value, dict):  # a table that is no section: suggest a section, not a setting
                raise ValueError(f"{source}: unknown section [{key}]; the sections are "
                                 f"{', '.join(f'[{s}]' for s in _SECTIONS)}{_suggest(key, list(_SECTIONS))}")
            else:
                config.set(key, value, source=source)
        if validate:
            config.validate(source)
        return config

    def set(self, key: str, value: Any, source: str = "config") -> None:
        """Set one dotted key (``train.lr``), checking the key and the value's type."""
        section, _, name = key.partition(".")
        value = _plain(value)
        if section == "lora" and name:
            if name not in _LORA_FIELDS:
                raise ValueError(f"{source}: unknown key {key!r}{_suggest(name, _LORA_FIELDS, 'lora.')}")
            self.lora[name] = value
            return
        if key not in _TYPES:
            raise ValueError(f"{source}: unknown key {key!r}{_suggest(key, list(_TYPES))}")
        _check_type(key, value, _TYPES[key], source)
        if _TYPES[key] is float and isinstance(value, int):
            value = float(value)
        target = self if "." not in key else getattr(self, section)
        setattr(target, key.rpartition(".")[2], value)

    def apply_overrides(self, overrides: list[str] | dict[str, Any] | None, source: str = "overrides", *,
                        validate: bool = True) -> None:
        """``"key=value"`` strings (values read as TOML) or a ``{key: value}`` dict. ``source`` is what errors
        call them: ``overrides`` (the Python argument) or ``--set`` (the CLI flag)."""
        if isinstance(overrides, str):  # one string would be read character by character
            raise TypeError(f"{source} must be a list of 'key=value' strings or a dict, got the string {overrides!r}")
        items = overrides.items() if isinstance(overrides, dict) else \
            [_split_override(o, source) for o in overrides or []]
        for key, value in items:
            self.set(key, parse_value(value) if isinstance(value, str) and not isinstance(overrides, dict) else value,
                     source=f"{source} {key}")
        if validate:
            self.validate(source)

    # -- checking ---------------------------------------------------------------
    def validate(self, source: str = "config") -> None:
        def bad(key: str, msg: str) -> None:
            raise ValueError(f"{source}: {key} {msg}")

        if not self.model.name:
            bad("model.name", "is required: 'minilm', 'smollm2-135m' or a model directory")
        if not self.data.train:
            bad("data.train", "is required: a JSONL, CSV or TSV file")
        if not self.output_dir:
            bad("output_dir", "is required")
        _one_of("model.dtype", self.model.dtype, DTYPES, source)
        _one_of("data.format", self.data.format, FORMATS, source)
        _one_of("task.type", self.task.type, TASKS, source)
        _one_of("train.method", self.train.method, METHODS, source)
        _one_of("train.scheduler", self.train.scheduler, SCHEDULERS, source)
        _one_of("train.distributed", self.train.distributed, DISTRIBUTED, source)
        _one_of("train.model_dropout", self.train.model_dropout, MODEL_DROPOUTS, source)
        _one_of("train.master_weights", self.train.master_weights, MASTER_WEIGHTS, source)
        if self.train.compile:
            import torch._dynamo  # only here: it takes a second to import

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.train.compile_backend not in backends:
                bad("train.compile_backend", f"= {self.train.compile_backend!r} is not a torch.compile backend; "
                                             f"choose one of {', '.join(sorted(backends))}")
        if not 0.0 <= self.data.validation_fraction < 1.0:
            bad("data.validation_fraction", f"must be >= 0 and < 1, got {self.data.validation_fraction}")
        for key in ("task.max_length", "task.max_target_length", "task.max_new_tokens", "train.epochs",
                    "train.batch_size", "train.eval_batch_size", "train.eval_batch_tokens", "train.grad_accum",
                    "train.log_every", "data.shuffle_buffer"):
            if self.get(key) < 1:
                bad(key, f"must be >= 1, got {self.get(key)}")
        for key in ("task.generate_rows", "train.max_steps", "train.warmup_steps", "train.eval_every",
                    "train.save_every", "train.early_stopping_patience", "train.num_threads",
                    "data.max_train_rows", "data.max_eval_rows", "data.max_test_rows"):
            value = self.get(key)
            if value is not None and value < 0:
                bad(key, f"must be >= 0, got {value}")
        for key in ("train.lr", "train.adam_eps"):
            if not (math.isfinite(self.get(key)) and self.get(key) > 0):
                bad(key, f"must be a finite number > 0, got {self.get(key)}")
        for key in ("train.loraplus_lr_ratio", "train.loraplus_lr_embedding"):
            if not (math.isfinite(self.get(key)) and self.get(key) > 0):
                bad(key, f"must be a finite number > 0, got {self.get(key)}")
        if self.train.loraplus_lr_ratio != 1 and self.train.method != "lora":
            bad("train.loraplus_lr_ratio", f"is for LoRA (B's learning rate); train.method is {self.train.method!r}")
        if self.train.lorafa and self.train.method != "lora":
            bad("train.lorafa", f"is for LoRA (A frozen); train.method is {self.train.method!r}")
        if self.train.lorafa and self.train.loraplus_lr_ratio != 1:
            bad("train.lorafa", "freezes A, so LoRA+'s ratio of B's rate to A's means nothing; set "
                "train.loraplus_lr_ratio = 1")
        for key in ("train.weight_decay", "train.max_grad_norm", "train.neftune_noise_alpha"):
            if not (math.isfinite(self.get(key)) and self.get(key) >= 0):
                bad(key, f"must be a finite number >= 0, got {self.get(key)}")
        if not 0.0 <= self.train.warmup_ratio < 1.0:
            bad("train.warmup_ratio", f"must be >= 0 and < 1, got {self.train.warmup_ratio}")
        betas = self.train.adam_betas
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            bad("train.adam_betas", f"must be two numbers in [0, 1), got {betas}")
        if self.data.labels is not None and (not self.data.labels or len(set(map(str, self.data.labels)))
                                             != len(self.data.labels)):
            bad("data.labels", f"must be a non-empty list of distinct labels, got {self.data.labels}")
        if self.task.type in ("causal_lm", "seq2seq") and not (self.data.output_field or self.data.messages_field):
            bad("data.output_field", f"(or data.messages_field) is required for task.type = {self.task.type!r}")
        refs = self.data.reference_fields
        if refs is not None and (not refs or not all(isinstance(f, str) and f for f in refs)):
            bad("data.reference_fields", f"must be a non-empty list of field names, got {refs!r}")
        if refs and (self.task.type == "classification" or self.data.messages_field):
            bad("data.reference_fields", "is for generation tasks that read data.output_field "
                "(not for classification or data.messages_field)")
        if self.train.neftune_noise_alpha and self.task.type not in ("causal_lm", "seq2seq"):
            bad("train.neftune_noise_alpha", f"is for instruction tuning (causal_lm, seq2seq); task.type is "
                f"{self.task.type!r}")
        if self.task.packing and self.task.type != "causal_lm":
            bad("task.packing", f"is for causal_lm; task.type is {self.task.type!r}")
        if self.task.type in PAIR_TASKS:
            self._validate_pairs(bad)
        if self.task.type == "preference":
            self._validate_preference(bad)
        if self.task.type == "kto":
            self._validate_kto(bad)
        if self.task.type == "grpo":
            self._validate_grpo(bad)
        for tasks, names in ((("preference",), ("preference_loss", "simpo_gamma", "sft_weight", "label_smoothing")),
                             (("preference", "kto"), ("dpo_beta", "precompute_reference", "max_prompt_length")),
                             (("reward",), ("reward_centering",)),
                             (("kto",), ("kto_desirable_weight", "kto_undesirable_weight")),
                             (("grpo",), ("num_generations", "temperature", "top_p", "top_k", "min_p",
                                          "repetition_penalty", "grpo_beta", "grpo_loss",
                                          "scale_rewards", "num_iterations", "grpo_epsilon", "grpo_epsilon_high",
                                          "importance_sampling_level", "mask_truncated_completions",
                                          "grpo_delta", "top_entropy_quantile", "entropy_coef",
                                          "sapo_temperature_pos",
                                          "sapo_temperature_neg",
                                          "generation_batch_size", "log_completions",
                                          "reward_model", "reward_label", "reward_function", "reward_weights"))):
            for name in names:
                if self.task.type not in tasks and getattr(self.task, name) != getattr(TaskSection, name):
                    bad(f"task.{name}", f"is for task.type = {' or '.join(map(repr, tasks))}; task.type is "
                        f"{self.task.type!r}")
        if self.data.margin_field is not None and self.task.type != "reward":
            bad("data.margin_field", f"is for task.type = 'reward'; task.type is {self.task.type!r}")
        if self.task.type == "reward" and not (math.isfinite(self.task.reward_centering)
                                               and self.task.reward_centering >= 0):
            bad("task.reward_centering", f"must be a finite number >= 0, got {self.task.reward_centering}")
        if self.task.type == "seq2seq" and self.data.messages_field:
            bad("data.messages_field", "is for causal_lm chat data; seq2seq reads input_field -> output_field")
        if self.model.quantize not in QUANTIZE_BITS:
            bad("model.quantize", f"must be 0 (no quantization), 4 (NF4) or 8 (int8), got {self.model.quantize}")
        if self.train.bf16 and self.train.fp16:
            bad("train.fp16", "and train.bf16 are both set: pick one autocast dtype")
        if self.train.fp16 and self.train.distributed == "fsdp":
            bad("train.fp16", "(loss scaling) is not supported with train.distributed = 'fsdp': use train.bf16")
        if self.model.quantize and self.train.method != "lora":
            bad("model.quantize", f"= {self.model.quantize} quantizes the frozen base under LoRA; train.method "
                f"{self.train.method!r} trains the base weights themselves, so it needs model.quantize = 0")
        if self.train.method == "lora":
            lora = self.lora_config()
            if lora.init_lora_weights in ("lora_ga", "corda") and self.model.quantize:
                bad("lora.init_lora_weights", f"= {lora.init_lora_weights!r} leaves a residual in the full-precision "
                    "weights, and the run saves the adapter as a LoRA of the original ones; it is not supported with "
                    "model.quantize")
            if lora.alora_invocation_tokens is not None and self.task.packing:
                bad("task.packing", "puts several rows into one sequence, and an aLoRA adapter "
                    "(lora.alora_invocation_tokens) applies from the last invocation of the sequence on: turn one off")
            if lora.kasa_config is not None and (self.model.quantize or self.train.distributed == "fsdp"):
                what = "model.quantize" if self.model.quantize else "train.distributed"
                bad(what, "is not supported with a KaSA adapter (lora.kasa_config), which truncates the "
                    "full-precision weights and regularizes whole factors")
            loftq_bits = lora.loftq_config.get("loftq_bits")
            if self.model.quantize and loftq_bits and loftq_bits != self.model.quantize:
                bad("lora.loftq_config", f"loftq_bits = {loftq_bits} fits a base quantized to {loftq_bits} bits, "
                    f"and model.quantize = {self.model.quantize}: set them alike")

    def _validate_pairs(self, bad) -> None:
        for key in ("data.chosen_field", "data.rejected_field"):
            if not isinstance(self.get(key), str) or not self.get(key):
                bad(key, f"must be a field name, got {self.get(key)!r}")
        if self.data.chosen_field == self.data.rejected_field:
            bad("data.rejected_field", f"is data.chosen_field too ({self.data.chosen_field!r}): a pair needs two")
        self._validate_scoring(bad, "two responses (data.chosen_field, data.rejected_field)",
                               ("data.output_field", "reads data.chosen_field and data.rejected_field"))

    def _validate_scoring(self, bad, responses: str, *more: tuple[str, str]) -> None:
        """What the tasks that score given responses share (preference, reward, kto): no generation settings, and
        a positive beta where they use one."""
        kind = self.task.type
        for key, why in (("data.messages_field", f"reads a prompt (data.instruction_field / data.input_field) and "
                                                 f"{responses}"), *more,
                         ("data.reference_fields", "scores responses, it does not generate them")):
            if self.get(key):
                bad(key, f"is not used by task.type = {kind!r}, which {why}")
        if self.task.generate_rows:
            bad("task.generate_rows", f"is for causal_lm and seq2seq; task.type {kind!r} evaluates scores")
        if kind in ("preference", "kto") and not (math.isfinite(self.task.dpo_beta) and self.task.dpo_beta > 0):
            bad("task.dpo_beta", f"must be a finite number > 0, got {self.task.dpo_beta}")
        limit = self.task.max_prompt_length
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not
                                  0 < limit < self.task.max_length):
            bad("task.max_prompt_length", f"must be a whole number of tokens between 1 and task.max_length - 1 "
                f"({self.task.max_length - 1}), got {limit!r}")
        if self.task.precompute_reference and self.data.streaming:
            bad("task.precompute_reference", "needs every example before the first step; data.streaming = true reads "
                "them as training goes")

    def _check_reference(self, bad, what: str) -> None:
        """Full fine-tuning of a loss with a reference model: only from precomputed log-probabilities."""
        if self.train.method != "lora" and not self.task.precompute_reference:
            bad("train.method", f"= {self.train.method!r} with {what}, which compares with a reference model, needs "
                "task.precompute_reference = true: the reference is otherwise the base model with the adapter "
                "switched off, and full fine-tuning leaves no base to switch back to")

    def _validate_kto(self, bad) -> None:
        d = self.data
        if not d.output_field:
            bad("data.output_field", "is required for task.type = 'kto': the field of each row's completion")
        if not (isinstance(d.label_field, str) and d.label_field):
            bad("data.label_field", f"must be the field that says whether a completion is desirable, got "
                f"{d.label_field!r}")
        for key in ("task.kto_desirable_weight", "task.kto_undesirable_weight"):
            if not (math.isfinite(self.get(key)) and self.get(key) > 0):
                bad(key, f"must be a finite number > 0, got {self.get(key)}")
        self._validate_scoring(bad, "a completion (data.output_field)")
        self._check_reference(bad, "task.type = 'kto'")

    def _validate_grpo(self, bad) -> None:
        t = self.task
        functions = t.reward_functions()
        if not (t.reward_model or functions):
            bad("task.reward_model", "(a lorafit reward or classification run, or a sequence-classification model) "
                "or task.reward_function (a Python function) is required for task.type = 'grpo': what scores the "
                "completions")
        if t.reward_label is not None and not t.reward_model:
            bad("task.reward_label", "names a class of task.reward_model's classifier; task.reward_model is not set")
        if t.num_generations < 2:
            bad("task.num_generations", f"must be >= 2 (a group's rewards are compared), got {t.num_generations}")
        if not (math.isfinite(t.temperature) and t.temperature > 0):
            bad("task.temperature", f"must be a finite number > 0, got {t.temperature}")
        if not 0 < t.top_p <= 1:
            bad("task.top_p", f"must be > 0 and <= 1, got {t.top_p}")
        if t.top_k < 0:
            bad("task.top_k", f"must be >= 0 (0: off), got {t.top_k}")
        if not 0 <= t.min_p < 1:
            bad("task.min_p", f"must be >= 0 and < 1 (0: off), got {t.min_p}")
        if not (math.isfinite(t.repetition_penalty) and t.repetition_penalty > 0):
            bad("task.repetition_penalty", f"must be a finite number > 0 (1: off), got {t.repetition_penalty}")
        if t.grpo_loss not in GRPO_LOSSES:
            bad("task.grpo_loss", f"must be one of {', '.join(map(repr, GRPO_LOSSES))}, got {t.grpo_loss!r}")
        if isinstance(t.scale_rewards, str) and t.scale_rewards not in SCALE_REWARDS:
            bad("task.scale_rewards", f"must be true, false or one of {', '.join(map(repr, SCALE_REWARDS))}, got "
                f"{t.scale_rewards!r}")
        if not all(f.strip() for f in functions) or (isinstance(t.reward_function, list) and not functions):
            bad("task.reward_function", f"must name a function ('path/to/file.py:name') or a list of them, got "
                f"{t.reward_function!r}")
        count = bool(t.reward_model) + len(functions)
        if t.reward_weights is not None:
            if len(t.reward_weights) != count:
                bad("task.reward_weights", f"must have one weight per reward ({count}: task.reward_model first, then "
                    f"task.reward_function's), got {len(t.reward_weights)}")
            if not all(math.isfinite(w) for w in t.reward_weights):
                bad("task.reward_weights", f"must be finite numbers, got {t.reward_weights}")
        if t.num_iterations < 1:
            bad("task.num_iterations", f"must be >= 1, got {t.num_iterations}")
        if t.generation_batch_size and t.generation_batch_size < t.num_generations:
            bad("task.generation_batch_size", f"must be 0 (a step's completions in one generation) or at least "
                f"task.num_generations ({t.num_generations}), one prompt's group, got {t.generation_batch_size}")
        for key in ("grpo_epsilon", "grpo_epsilon_high"):
            value = getattr(t, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                bad(f"task.{key}", f"must be a finite number > 0, got {value}")
        for key in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not (math.isfinite(getattr(t, key)) and getattr(t, key) > 0):
                bad(f"task.{key}", f"must be a finite number > 0, got {getattr(t, key)}")
            if t.grpo_loss != "sapo" and getattr(t, key) != getattr(TaskSection, key):
                bad(f"task.{key}", f"is for task.grpo_loss = 'sapo'; task.grpo_loss is {t.grpo_loss!r}")
        if t.grpo_delta is not None and t.grpo_loss in ("cispo", "sapo"):
            bad("task.grpo_delta", f"caps the ratio of the clipped objective; task.grpo_loss = {t.grpo_loss!r} has "
                "no clip")
        high = 1 + (t.grpo_epsilon if t.grpo_epsilon_high is None else t.grpo_epsilon_high)
        if t.grpo_delta is not None and not (math.isfinite(t.grpo_delta) and t.grpo_delta > high):
            # below the clip's upper end it would cap the ratio of positive advantages too
            bad("task.grpo_delta", f"must be a finite number above the clip's upper end 1 + task.grpo_epsilon_high "
                f"({high:g}); got {t.grpo_delta}")
        if not math.isfinite(t.entropy_coef):
            bad("task.entropy_coef", f"must be a finite number (0: no entropy bonus), got {t.entropy_coef}")
        if not 0 <= t.top_entropy_quantile <= 1:
            bad("task.top_entropy_quantile", f"must be between 0 (only the highest-entropy token) and 1 (every "
                f"token), got {t.top_entropy_quantile}")
        if t.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            bad("task.importance_sampling_level", f"must be one of {', '.join(map(repr, IMPORTANCE_SAMPLING_LEVELS))}, "
                f"got {t.importance_sampling_level!r}")
        # a checkpoint mid-way through a batch's steps would need its samples to resume from
        for key in ("train.eval_every", "train.save_every"):
            if t.num_iterations > 1 and self.get(key) % t.num_iterations:
                bad(key, f"({self.get(key)}) must be a multiple of task.num_iterations ({t.num_iterations}): "
                    "evaluations and checkpoints come between batches of samples, not within one")
        if not (math.isfinite(t.grpo_beta) and t.grpo_beta >= 0):
            bad("task.grpo_beta", f"must be a finite number >= 0, got {t.grpo_beta}")
        if t.max_new_tokens >= t.max_length:
            bad("task.max_new_tokens", f"({t.max_new_tokens}) must leave room for a prompt within task.max_length "
                f"({t.max_length})")
        if t.generate_rows or self.data.reference_fields:
            bad("task.generate_rows" if t.generate_rows else "data.reference_fields", "is for causal_lm and "
                "seq2seq's ROUGE; task.type 'grpo' evaluates the reward of sampled completions")
        if t.grpo_beta and self.train.method != "lora":
            bad("train.method", f"= {self.train.method!r} with task.grpo_beta > 0 compares with a reference model, "
                "the base with the adapter switched off, which full fine-tuning leaves none of; set task.grpo_beta = 0")
        if self.train.distributed == "fsdp":
            bad("train.distributed", "= 'fsdp' is not supported for task.type 'grpo' (sampling from a sharded "
                "model); use 'ddp'")

    def _validate_preference(self, bad) -> None:
        t = self.task
        if t.preference_loss not in PREFERENCE_LOSSES:
            bad("task.preference_loss", f"must be one of {', '.join(PREFERENCE_LOSSES)}, got {t.preference_loss!r}")
        if not math.isfinite(t.simpo_gamma):
            bad("task.simpo_gamma", f"must be a finite number, got {t.simpo_gamma}")
        if t.simpo_gamma != TaskSection.simpo_gamma and t.preference_loss != "simpo":
            bad("task.simpo_gamma", f"is SimPO's margin; task.preference_loss is {t.preference_loss!r}")
        if not (math.isfinite(t.sft_weight) and t.sft_weight >= 0):
            bad("task.sft_weight", f"must be a finite number >= 0, got {t.sft_weight}")
        if not (math.isfinite(t.label_smoothing) and 0 <= t.label_smoothing < 0.5):
            bad("task.label_smoothing", f"must be a number in [0, 0.5), got {t.label_smoothing}")
        if t.label_smoothing and t.preference_loss not in ("dpo", "simpo"):
            bad("task.label_smoothing", f"is for the sigmoid losses dpo and simpo; task.preference_loss is "
                f"{t.preference_loss!r}")
        if t.sft_weight and t.preference_loss == "orpo":
            bad("task.sft_weight", "adds an NLL term that task.preference_loss = 'orpo' already holds (weight 1)")
        if t.preference_loss in REFERENCE_FREE_LOSSES:
            if t.precompute_reference:
                bad("task.precompute_reference", f"task.preference_loss = {t.preference_loss!r} uses no reference "
                    "model")
        else:
            self._check_reference(bad, f"task.preference_loss = {t.preference_loss!r}")

    def lora_config(self, base_model: str | None = None) -> LoraConfig:
        """The adapter this run attaches: [lora], with ``task_type`` from task.type and
        ``base_model_name_or_path`` = ``base_model`` where [lora] does not set them. The classification
        head is not listed here: ``lorafit.attach`` adds it to modules_to_save for task_type SEQ_CLS."""
        expected = LORA_TASK_TYPES.get(self.task.type)
        given = self.lora.get("task_type", expected)
        if expected is not None and given != expected:
            raise ValueError(f"[lora]: task_type = {given!r} does not match task.type = {self.task.type!r}, which "
                             f"trains a {expected} adapter; drop lora.task_type (lorafit sets it)")
        lora = {"task_type": expected, **self.lora}
        if base_model is not None:
            lora.setdefault("base_model_name_or_path", base_model)
        try:
            return LoraConfig(**lora)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"[lora]: {exc}") from None

    def get(self, key: str) -> Any:
        obj: Any = self
        for part in key.split("."):
            obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
        return obj

    # -- serialising ------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"output_dir": self.output_dir}
        for name in _SECTIONS:
            section = getattr(self, name)
            values = dict(section) if isinstance(section, dict) else dataclasses.asdict(section)
            out[name] = {k: v for k, v in values.items() if v is not None}
        return out

    def to_toml(self) -> str:
        lines = [f"output_dir = {_toml_value(self.output_dir)}"]
        for name, values in self.to_dict().items():
            if name == "output_dir":
                continue
            lines += ["", f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        return "\n".join(lines) + "\n"


def load_config(config: str | os.PathLike | dict[str, Any], overrides: list[str] | dict[str, Any] | None = None,
                *, overrides_source: str = "overrides") -> RunConfig:
    """A run config from a TOML file, or from a dict shaped like one (see ``RunConfig.from_dict``), with
    ``key=value`` overrides applied. The result is checked once the overrides are in, so an override may
    supply what the file leaves out (``output_dir``, say)."""
    if isinstance(config, dict):
        source, data = "config (dict)", config
    else:
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        try:
            source, data = str(path), tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc})") from None
    result = RunConfig.from_dict(data, source=source, validate=False)
    if not overrides:
        result.validate(source)
        return result
    try:
        result.validate(source)
        blame = overrides_source  # the file alone is valid: what fails from here on came with the overrides
    except ValueError:
        blame = f"{source} with {overrides_source}"
    result.apply_overrides(overrides, source=overrides_source, validate=False)
    result.validate(blame)
    return result


def parse_value(text: str) -> Any:
    """``--set`` values: TOML (``3``, ``1e-4``, ``true``, ``["q", "v"]``) or else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def default_data_dir() -> Path:
    """$LORAFIT_DATA, else ../shared/data beside the repository this package lives in."""
    if os.environ.get("LORAFIT_DATA"):
        return Path(os.environ["LORAFIT_DATA"])
    return Path(__file__).resolve().parents[3].parent / "shared" / "data"


def expand_path(text: str) -> Path:
    """A data path with ``${LORAFIT_DATA}`` (or ``$LORAFIT_DATA``) and ``~`` expanded."""
    text = re.sub(r"\$\{LORAFIT_DATA\}|\$LORAFIT_DATA\b", lambda _: str(default_data_dir()), text)
    return Path(os.path.expandvars(text)).expanduser()


# -- internals ------------------------------------------------------------------------

_SECTIONS = ("model", "data", "task", "lora", "train")
_LORA_FIELDS = [f.name for f in dataclasses.fields(LoraConfig)]


def _collect_types() -> dict[str, Any]:
    types: dict[str, Any] = {"output_dir": str}
    for name, cls in (("model", ModelSection), ("data", DataSection), ("task", TaskSection), ("train", TrainSection)):
        for key, hint in typing.get_type_hints(cls).items():
            types[f"{name}.{key}"] = hint
    return types


_TYPES = _collect_types()


def _check_type(key: str, value: Any, hint: Any, source: str) -> None:
    if not _matches(value, hint):
        raise ValueError(f"{source}: {key} must be {_describe(hint)}, got {value!r}")


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is list or origin is list:
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list or hint is list:
        plural = {int: "integers", float: "numbers", str: "strings", bool: "true/false values"}
        return "a list" + (f" of {plural.get(args[0], str(args[0]))}" if args else "")
    if args:  # a union, None left out (an Optional setting may also be unset)
        return " or ".join(_describe(a) for a in args)
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _one_of(key: str, value: Any, allowed: tuple, source: str) -> None:
    if value not in allowed:
        raise ValueError(f"{source}: {key} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
                         f"{_suggest(str(value), list(allowed))}")


# What other tools (transformers' TrainingArguments, PEFT, most tutorials) call lorafit's settings: a user's
# first guess, which spelling distance alone points elsewhere (learning_rate is closer to
# early_stopping_patience than to lr)
_ALIASES = {"learning_rate": "lr", "rank": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
            "num_epochs": "epochs", "num_train_epochs": "epochs", "training": "train", "trainer": "train",
            "per_device_train_batch_size": "batch_size", "per_device_eval_batch_size": "eval_batch_size",
            "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler",
            "warmup": "warmup_steps", "max_seq_length": "max_length", "model_name": "name",
            "model_name_or_path": "name", "dataset": "train", "train_file": "train", "eval_steps": "eval_every",
            "save_steps": "save_every", "logging_steps": "log_every", "target": "target_modules"}


def _suggest(word: str, choices: list[str], prefix: str = "") -> str:
    head, dot, last = word.rpartition(".")
    alias = head + dot + _ALIASES.get(last, "")
    if alias in choices and alias != word:
        return f"; did you mean {prefix + alias!r}?"
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean {prefix + close[0]!r}?" if close else ""


def _split_override(text: Any, source: str) -> tuple[str, str]:
    key, sep, value = text.partition("=") if isinstance(text, str) else ("", "", "")
    if not sep or not key.strip():
        raise ValueError(f"{source} expects key=value (e.g. train.lr=1e-4), got {text!r}")
    return key.strip(), value.strip()


def _plain(value: Any) -> Any:
    """A Python value as TOML would have given it: paths as strings, tuples as lists."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        import json

        return json.dumps(value, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write {value!r} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)
