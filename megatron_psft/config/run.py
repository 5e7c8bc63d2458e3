"""How long a run trains and when it stops, what it saves and loads, and what it reports."""

from dataclasses import dataclass
from typing import Optional

from megatron_psft.config.base import Section


@dataclass(frozen=True)
class TrainingConfig(Section):
    train_iters: int = 1
    seed: int = 1234
    sft_warmup_steps: int = 0  # plain-SFT steps before the objective starts
    sft_warmup_lr: Optional[float] = None  # default: --lr
    exit_interval: int = 0  # stop (and save) at a multiple of this step; the schedule still spans train_iters
    exit_duration_in_mins: Optional[float] = None
    exit_signal_handler: bool = False  # on SIGTERM: finish the step, save, exit 0

    def __post_init__(self):
        self.at_least("train_iters", 1)
        self.non_negative("sft_warmup_steps", "exit_interval")
        self.positive("exit_duration_in_mins", optional=True)
        if self.sft_warmup_lr is not None:
            self.non_negative("sft_warmup_lr")


@dataclass(frozen=True)
class CheckpointConfig(Section):
    load: Optional[str] = None  # a training checkpoint resumes; a weights-only one starts from its weights
    save: Optional[str] = None
    save_interval: int = 0  # 0: only at the end
    pretrained_checkpoint: Optional[str] = None
    finetune: bool = False  # from --load the weights only: step 0, fresh optimizer, schedule and old policy
    no_load_optim: bool = False  # from --load the weights and the step
    override_opt_param_scheduler: bool = False
    use_checkpoint_opt_param_scheduler: bool = False
    async_save: bool = False  # saves overlap training (megatron-core's asynchronous dist-checkpointing)

    def __post_init__(self):
        self.non_negative("save_interval")
        self.require(self.save or not self.async_save, "--async-save needs --save")
        self.require(not (self.override_opt_param_scheduler and self.use_checkpoint_opt_param_scheduler),
                     "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
        self.require(self.load or not (self.finetune or self.no_load_optim), "--finetune / --no-load-optim need --load")


@dataclass(frozen=True)
class LoggingConfig(Section):
    metrics_file: Optional[str] = None  # default: SAVE/metrics.jsonl
    tensorboard_dir: Optional[str] = None
    log_clipped_tokens: bool = False
    log_interval: int = 1
    metrics_file_every_interval: bool = False
    timing_log_level: int = 0
    straggler_factor: float = 1.5
    wandb_project: Optional[str] = None
    wandb_exp_name: Optional[str] = None
    wandb_save_dir: Optional[str] = None
    profile: bool = False
    profile_step_start: int = 2
    profile_step_end: int = 3
    profile_dir: Optional[str] = None

    def __post_init__(self):
        self.at_least("log_interval", 1)
        self.require(self.timing_log_level in (0, 1), f"--timing-log-level must be 0 or 1, got {self.timing_log_level}")
        self.require(self.straggler_factor > 1, f"--straggler-factor must exceed 1, got {self.straggler_factor}")
        self.require(not self.profile or 1 <= self.profile_step_start <= self.profile_step_end,
                     "--profile needs 1 <= --profile-step-start <= --profile-step-end")
