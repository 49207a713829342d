"""The typed sections of a recipe that a task and the Trainer read: training, sample and
tokenizer settings, and `TaskSettings`, the bundle a task module receives instead of the recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tformer.config import ConfigError, check_choice, check_finite, check_fraction, check_positive

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ADVERSARIAL = ("none", "pgd", "embedding")
STRATEGIES = ("ddp", "fsdp2")  # how several processes share a model (training.distributed)
DEFAULT_WARMUP = 100  # steps of linear warm-up when a recipe names none (capped at max_steps)


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 12  # sequences per optimizer step, summed over processes and micro-batches
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int | None = None  # None: min(100, max_steps); more than max_steps is refused
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    precision: str = "auto"  # auto: bf16 autocast on GPUs that have it and on AMX CPUs for models >= 128 wide
    eval_every: int = 250
    eval_batches: int = 20
    checkpoint_every: int | None = None  # None: with every evaluation
    log_every: int = 10
    early_stop_patience: int | None = None  # evaluations without improvement before stopping
    max_bad_steps: int = 3  # non-finite steps in a row before restoring the last checkpoint
    seed: int = 1337
    compile: bool = False
    device: str = "auto"
    # Several processes (torchrun): "ddp" (a full copy each, gradients all-reduced) or "fsdp2"
    # (parameters, gradients and optimizer state sharded over the processes, per Block then the
    # root). A single process ignores it.
    strategy: str = "ddp"
    threads: int | None = None  # CPU intra-op threads; None: one per core other processes leave free
    # Recompute each Block's activations in the backward pass instead of keeping them: true (every
    # block), N (every N-th block: the N-th, 2N-th, ...) or false. Same gradients, less memory.
    activation_checkpointing: bool | int = False
    # Adversarial training (classification tasks): "none"; "pgd" (images: an L-inf PGD attack in
    # pixel space, [0, 1] kept); "embedding" (text: a perturbation of the token embeddings, FreeLB /
    # PGD-style). The loss is (1 - weight) * clean + weight * adversarial.
    adversarial: str = "none"
    adversarial_epsilon: float = 0.1  # L-inf radius (pixels in [0, 1]; embeddings: per dimension)
    adversarial_steps: int = 3  # attack steps per training step
    adversarial_step_size: float | None = None  # None: 2.5 * epsilon / steps
    adversarial_weight: float = 1.0  # share of the adversarial loss in the training loss

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip"):
            check_finite(f"training.{name}", getattr(self, name))
        for name in ("max_steps", "batch_size", "grad_accum", "lr", "eval_every", "eval_batches",
                     "log_every", "max_bad_steps"):
            check_positive(f"training.{name}", getattr(self, name))
        for name in ("weight_decay", "grad_clip"):  # grad_clip 0 disables clipping
            check_positive(f"training.{name}", getattr(self, name), allow_zero=True)
        for name in ("beta1", "beta2"):
            check_fraction(f"training.{name}", getattr(self, name))
        for name in ("checkpoint_every", "early_stop_patience", "min_lr", "threads"):
            if getattr(self, name) is not None:
                check_positive(f"training.{name}", getattr(self, name), allow_zero=name == "min_lr")
        self._check_warmup()
        self._check_adversarial()
        self._check_activation_checkpointing()
        check_choice("schedule", self.schedule, ("cosine", "linear", "constant"))
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("training.strategy", self.strategy, STRATEGIES)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"batch_size ({self.batch_size}) must be divisible by grad_accum "
                              f"({self.grad_accum})")

    def _check_warmup(self) -> None:
        """A warm-up longer than the run never reaches `lr` and never decays: refuse it. The
        default (None) is 100 steps, or the whole run when that is shorter."""
        if self.warmup_steps is None:
            object.__setattr__(self, "warmup_steps", min(DEFAULT_WARMUP, self.max_steps))
        check_positive("training.warmup_steps", self.warmup_steps, allow_zero=True)
        if self.warmup_steps > self.max_steps:  # type: ignore[operator]
            raise ConfigError(f"training.warmup_steps ({self.warmup_steps}) is longer than the run "
                              f"(training.max_steps={self.max_steps}): the learning rate would never "
                              f"reach training.lr; set training.warmup_steps <= {self.max_steps}")

    def _check_activation_checkpointing(self) -> None:
        value = self.activation_checkpointing
        if not isinstance(value, (bool, int)) or (not isinstance(value, bool) and value < 1):
            raise ConfigError(f"training.activation_checkpointing={value!r} is not valid; set true (every "
                              f"block), false, or N >= 1 (every N-th block)")

    def _check_adversarial(self) -> None:
        check_choice("training.adversarial", self.adversarial, ADVERSARIAL)
        check_finite("training.adversarial_epsilon", self.adversarial_epsilon)
        check_positive("training.adversarial_epsilon", self.adversarial_epsilon)
        check_positive("training.adversarial_steps", self.adversarial_steps)
        check_finite("training.adversarial_weight", self.adversarial_weight)
        if not 0.0 <= self.adversarial_weight <= 1.0:
            raise ConfigError(f"training.adversarial_weight must be in [0, 1] (the adversarial loss's share), "
                              f"got {self.adversarial_weight}")
        if self.adversarial_step_size is not None:
            check_finite("training.adversarial_step_size", self.adversarial_step_size)
            check_positive("training.adversarial_step_size", self.adversarial_step_size)

    @property
    def adversarial_step(self) -> float:
        """The attack's step size: as given, else 2.5 * epsilon / steps (Madry et al.)."""
        if self.adversarial_step_size is not None:
            return self.adversarial_step_size
        return 2.5 * self.adversarial_epsilon / self.adversarial_steps

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr


@dataclass(frozen=True)
class TokenizerSpec:
    kind: str = "char"  # char | bpe | file
    vocab_size: int = 4096  # bpe only
    path: str | None = None  # kind=file: a tokenizer JSON (tformer or Hugging Face tokenizer.json)
    special_tokens: tuple[str, ...] = ("<|endoftext|>",)  # bpe only; one item may be given alone

    def __post_init__(self) -> None:
        check_choice("tokenizer.kind", self.kind, ("char", "bpe", "file"))
        if isinstance(self.special_tokens, str):  # a lone token, never its characters
            object.__setattr__(self, "special_tokens", (self.special_tokens,))
        if self.kind == "file" and not self.path:
            raise ConfigError("tokenizer.kind=file needs tokenizer.path (a tokenizer JSON file)")
        object.__setattr__(self, "special_tokens", tuple(self.special_tokens))


@dataclass(frozen=True)
class SampleSpec:
    prompt: str = "\n"
    tokens: int = 200

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise ConfigError(f"sample.tokens must be >= 1, got {self.tokens}")


@dataclass(frozen=True)
class TaskSettings:
    """What a task module reads: its own data section, the training and sample sections, and
    where outputs go. Never the whole recipe."""

    data: Any  # the task module's DataSpec
    training: TrainConfig = TrainConfig()
    sample: SampleSpec = SampleSpec()
    run_dir: Path = Path("runs/default")
