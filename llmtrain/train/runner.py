"""Wire a run together: config -> dist -> tokenizer -> data -> model -> engine -> resume -> loop -> export.

`run_task(cfg, objective)` is what `llmtrain <task>` and launch/<task>.py call (llmtrain/cli/train.py
parses the command line and turns errors into exit statuses). The runner is the one component
that holds the whole recipe; it hands each other component the section it uses.
"""
from __future__ import annotations

import copy
import dataclasses
import glob
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from .. import distributed as dist
from ..config import Config, save_resolved
from ..data.protocol import DataContext, TrainData
from ..data.tokenizer_id import tokenizer_hash
from ..distributed import preflight
from ..distributed.mesh import build_mesh, check_model, check_zero_stage
from ..distributed.mesh import set_current as set_current_mesh
from ..errors import ConfigError
from ..models.fastpaths import apply_fast_paths
from ..models import sequence_parallel
from ..models.loading import load_model
from ..models.params import count_parameters
from ..models.tiled_mlp import apply_tiled_mlp
from ..models.tokenizer import load_tokenizer
from ..objectives.base import Objective
from ..tools import plots
from . import checkpoint, export, universal
from .ds_config import build_ds_config, resolve_precision, zero_stage
from .engine import EngineAdapter, accumulation_note, initialize
from .flops import flops_per_token
from .loop import RunState, train_loop
from .metrics import make_logger
from .optim import apply_train_settings


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output_dir(cfg: Config, resuming: bool) -> None:
    """Never overwrite another run silently: an existing run dir needs resume or overwrite_output_dir."""
    marker = os.path.join(cfg.output_dir, "config.yaml")
    if os.path.exists(marker) and not resuming and not cfg.overwrite_output_dir:
        if cfg.train.resume == "never" or os.path.isdir(os.path.join(cfg.output_dir, "final")):
            raise ConfigError(
                f"output_dir {cfg.output_dir} already holds a run; set train.resume=auto to continue it, "
                "overwrite_output_dir=true to replace it, or choose another output_dir"
            )


@dataclass
class Run:
    """Everything of one run; `Objective.setup` sees it as an objectives.base.RunContext."""

    cfg: Config
    info: Any  # distributed.DistInfo
    objective: Objective
    tokenizer: Any
    tok_hash: str
    data: TrainData
    adapter: EngineAdapter  # backward/step for the loop
    ds_config: dict
    precision: str
    logger: Any
    state: RunState
    data_state: Optional[dict] = None  # data position after the last trained step (the loop prefetches ahead)
    # training FLOPs per token of the whole model, counted before AutoTP shards the weights (flops.py)
    model_flops_per_token: Optional[int] = None

    @property
    def engine(self):
        """The DeepSpeed engine (what objectives forward through, checkpoints save and final/ exports)."""
        return self.adapter.engine

    @property
    def stage(self) -> int:
        return self.adapter.stage

    @property
    def train(self):
        return self.cfg.train

    @property
    def seq_len(self) -> int:
        return self.cfg.data.max_seq_len

    def load_model(self, ds_config: dict, name_or_path: Optional[str] = None, head: Optional[str] = None) -> torch.nn.Module:
        """The starting model once more, exactly as the run loaded it (RunContext.load_model); or, with
        name_or_path / head, another model loaded the same way (seed, LoRA, precision, ZeRO-3 init)."""
        c = self.cfg
        m = c.model if name_or_path is None else dataclasses.replace(c.model, name_or_path=name_or_path, config=None,
                                                                      revision=None)
        model = load_model(m, c.lora, c.train.seed, self.tokenizer, ds_config, self.precision, self.info.device,
                           head=head or self.objective.head)
        if name_or_path is None and head is None:
            self.objective.prepare_model(model)
        return model

    def new_engine(self, model: torch.nn.Module, t, ds_config: dict) -> EngineAdapter:
        """A second trainable engine (RunContext.new_engine), built like the run's own with TrainConfig t."""
        ds_config = copy.deepcopy(ds_config)
        # the optimizer block was written from the run's train.*: DeepSpeed takes the initial LR (and the
        # LR schedule's base) from it, not from the parameter groups
        ds_config["optimizer"]["params"].update(lr=t.lr, betas=[t.adam_beta1, t.adam_beta2], eps=t.adam_eps,
                                                weight_decay=t.weight_decay)
        adapter = initialize(model, t, ds_config, self.info.world_size, self.info.device, self.cfg.deepspeed.config,
                             mesh=self.info.mesh)
        adapter.engine.llmtrain_train = t  # a resume applies these settings to it (runner.resume)
        return adapter

    def trainer_state(self) -> dict:
        t = self.cfg.train
        return {
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "skipped_steps": self.state.skipped_steps,
            "consecutive_skips": self.state.consecutive_skips,
            "data": self.data_state if self.data_state is not None else self.data.state_dict(),
            "tokenizer_hash": self.tok_hash,
            "global_batch": t.micro_batch_size * t.grad_accum * self.info.data_world_size,
            "world_size": self.info.world_size,
            "sequence_parallel_size": self.cfg.parallel.sequence_parallel_size,
            "tensor_parallel_size": self.cfg.parallel.tensor_parallel_size,
            "task": self.objective.name,
            "extra_engines": sorted(self.objective.extra_engines()),  # their checkpoints: <tag>/<name>/
        }

    def save_checkpoint(self) -> None:
        rank_data = self.data.rank_state() if hasattr(self.data, "rank_state") else None
        path = checkpoint.save(self.engine, self.cfg, self.trainer_state(), extra=self.objective.extra_engines(),
                               rank_data=rank_data)
        self.logger.message(f"step {self.state.step}: checkpoint {path}")


def check_resume_identity(cfg: Config, saved: dict, current: dict) -> None:
    """Resuming must continue the same run: same data, tokenizer and global batch."""
    problems = []
    if saved["data"].get("fingerprint") != current["data"].get("fingerprint"):
        problems.append("the training data changed")
    if saved["tokenizer_hash"] != current["tokenizer_hash"]:
        problems.append("the tokenizer changed")
    if saved["global_batch"] != current["global_batch"]:
        problems.append(f"the global batch changed ({saved['global_batch']} -> {current['global_batch']})")
    if problems and cfg.train.resume_force:
        dist.print0(f"warning: resuming anyway (train.resume_force): {'; '.join(problems)}; the run is no longer exact")
    elif problems:
        raise ConfigError(f"train.resume: cannot resume exactly: {'; '.join(problems)}; start a new output_dir, "
                          "set train.resume_force=true to continue inexactly, or train.resume=never with overwrite_output_dir=true")


def check_resume_step(cfg: Config, resume_path: str) -> None:
    """Extending or shortening a run is fine; ending it before the checkpoint's step is not."""
    saved_step = checkpoint.saved_state(resume_path)["step"]
    if cfg.train.max_steps < saved_step:
        raise ConfigError(f"{cfg.where('train.max_steps')}: train.max_steps={cfg.train.max_steps} is below step "
                          f"{saved_step} of the checkpoint to resume ({resume_path}); set train.max_steps >= "
                          f"{saved_step}, or train.resume=never with overwrite_output_dir=true to start over")


def check_resume_tp(cfg: Config, resume_path: str) -> None:
    """DeepSpeed's checkpoint holds one model file per TP rank (mp_rank_XX); loading it at another TP
    size fails deep inside its Megatron merge (state_dict_factory.py:423): one line before that."""
    saved_tp = checkpoint.saved_state(resume_path).get("tensor_parallel_size", 1)
    tp = cfg.parallel.tensor_parallel_size
    if saved_tp != tp:
        raise ConfigError(f"{cfg.parallel.where('parallel.tensor_parallel_size')}: parallel.tensor_parallel_size={tp} "
                          f"but the checkpoint to resume ({resume_path}) was written with {saved_tp}; resume at the "
                          "same TP size, or start a new run (train.resume=never) from a final/ export")


def _start(cfg: Config, info) -> Optional[str]:
    """Rank 0 readies output_dir (config.yaml, run identity); returns the checkpoint to resume, if any."""
    resume_path = checkpoint.find_resume(cfg)
    check_output_dir(cfg, resuming=resume_path is not None)
    if resume_path is not None:
        check_resume_step(cfg, resume_path)
        check_resume_tp(cfg, resume_path)
    if info.is_main:
        if cfg.overwrite_output_dir and resume_path is None:
            for sub in ("checkpoints", "final"):  # asked for explicitly: the old run goes
                shutil.rmtree(os.path.join(cfg.output_dir, sub), ignore_errors=True)
            # but not the prepared data in output_dir/cache: it is keyed by content (another job may be
            # reading it, `llmtrain prepare` may have made it for this run); the DPO reference log-probs
            # there are keyed by the model's path only, and its weights may have changed: those go
            for f in glob.glob(os.path.join(cfg.output_dir, "cache", "ref_logps-*")):
                os.remove(f)
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_resolved(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        checkpoint.write_run_id(cfg.output_dir, fresh=resume_path is None)  # checkpoints carry it (universal.py)
    dist.barrier()
    return resume_path


def _universal_if_resized(cfg: Config, info, ds_config: dict, resume_path: Optional[str]) -> Optional[str]:
    if resume_path is None or zero_stage(ds_config) == 0:
        return resume_path
    saved = checkpoint.saved_state(resume_path)
    saved_world = saved.get("world_size", info.world_size)
    if saved_world == info.world_size:
        return resume_path
    off = ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}
    if zero_stage(ds_config) == 3 and off.get("device", "none") != "none" and float(off.get("ratio", 1.0)) < 1.0:
        # stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3 writes only self.optimizer's state: the
        # sub-groups a partial offload keeps on the GPU (stepped by backup_optimizer) would lose their Adam moments
        raise ConfigError(f"train.resume: {resume_path} was written by {saved_world} rank(s), now {info.world_size}, and "
                          f"the ZeRO-3 offload_optimizer.ratio is {off['ratio']} (< 1): DeepSpeed's universal load would "
                          "drop the Adam state of the sub-groups kept on the GPU; resume at the saved world size, or "
                          "with offload_optimizer.ratio 1 for the resume")
    # ZeRO partitions optimizer state by rank: go through DeepSpeed's universal format
    dist.print0(f"resume: checkpoint written by {saved_world} rank(s), now {info.world_size}: "
                "loading it through a universal checkpoint")
    ds_config.setdefault("checkpoint", {})["load_universal"] = True  # keeps the JSON's writer settings
    # rank 0 converts (the extra engines' directories too, e.g. PPO's critic); the others poll, no collective
    return universal.prepare(cfg, resume_path, extra=saved.get("extra_engines") or ())


def setup(cfg: Config, objective: Objective) -> Run:
    p = cfg.parallel
    if not objective.model_parallel and max(p.sequence_parallel_size, p.tensor_parallel_size) > 1:
        key = "parallel.sequence_parallel_size" if p.sequence_parallel_size > 1 else "parallel.tensor_parallel_size"
        raise ConfigError(f"{p.where(key)}: {key} > 1 is not supported by `llmtrain {objective.name}` yet "
                          "(sft, pretrain and dpo support it); set it to 1")
    info = dist.init(cfg.dist.timeout_minutes, cfg.dist.backend)
    mesh = build_mesh(cfg.parallel, info.world_size, info.rank)  # DP x SP x TP: one line if the world does not split
    info = dataclasses.replace(info, mesh=mesh)
    set_current_mesh(mesh)
    for line in cfg.notices:  # values adjusted while loading (e.g. warmup clamped to max_steps)
        dist.print0(line)
    tokenizer = load_tokenizer(cfg.model)
    tok_hash = tokenizer_hash(tokenizer)
    preflight.run(cfg, info, tok_hash)  # same config/code/tokenizer/data on every rank; rank table; link bandwidth
    seed_everything(cfg.train.seed)
    resume_path = _start(cfg, info)

    t = cfg.train
    ds_config = build_ds_config(t, cfg.deepspeed, info.world_size, info.device, mesh)
    check_zero_stage(cfg.parallel, zero_stage(ds_config), cfg.deepspeed.config)
    precision = resolve_precision(t, info.device)
    data = objective.build_data(DataContext.of(cfg, tokenizer, info, tok_hash))
    resume_path = _universal_if_resized(cfg, info, ds_config, resume_path)
    model = load_model(cfg.model, cfg.lora, t.seed, tokenizer, ds_config, precision, info.device, head=objective.head)
    objective.prepare_model(model)  # e.g. the reward model's zeroed head: before the engine copies the weights
    model = apply_fast_paths(model, cfg.model, info.device)  # model.liger / model.compile (explicit switches)
    check_model(cfg.parallel, model.config)  # heads divisible by SP/TP, a TP-supported architecture
    if apply_tiled_mlp(model, cfg.parallel):  # parallel.tiled_mlp_shards: per MLP instance, before ZeRO wraps it
        dist.print0(f"tiled MLP: {cfg.parallel.tiled_mlp_shards} tiles per decoder MLP")
    # Ulysses attention + SP groups, before deepspeed.initialize (every rank; a no-op without SP)
    mpu = sequence_parallel.register(model, mesh.sp).mpu if mesh.sp > 1 else None
    trainable, total = count_parameters(model)
    model_flops = flops_per_token(model, cfg.data.max_seq_len)  # before AutoTP replaces layers by shards
    adapter = initialize(model, t, ds_config, info.world_size, info.device, cfg.deepspeed.config, mesh=mesh, mpu=mpu)
    dist.print0(
        f"llmtrain {objective.name}: {info.world_size} rank(s) via {info.launcher}, {info.device.type}/{info.backend}, "
        f"ZeRO-{adapter.stage}, {precision}{accumulation_note(adapter.engine, t, precision)}, {mesh.describe()}, "
        f"params {total:,} ({trainable:,} trainable), "
        f"global batch {t.micro_batch_size * t.grad_accum * info.data_world_size} "
        f"{'packed rows' if cfg.data.packing else 'sequences'} of <= {cfg.data.max_seq_len} tokens"
    )

    state = RunState()
    run = Run(cfg, info, objective, tokenizer, tok_hash, data, adapter, ds_config, precision, None, state,
              model_flops_per_token=model_flops)
    objective.setup(run)  # e.g. DPO's reference: before a resume overwrites the starting weights
    if resume_path is not None:
        resume(run, resume_path)
    run.logger = make_logger(cfg, info.is_main, state.step)
    return run


def resume(run: Run, resume_path: str) -> None:
    """Model, optimizer, scheduler, RNG, data position and counters from the checkpoint; then the
    recipe's schedule and optimizer settings, which may differ from the checkpoint's."""
    cfg, state = run.cfg, run.state
    saved = checkpoint.load(run.engine, resume_path, cfg.train.seed, extra=run.objective.extra_engines())
    check_resume_identity(cfg, saved, run.trainer_state())
    run.data.load_state_dict(saved["data"])
    if hasattr(run.data, "load_rank_state"):
        run.data.load_rank_state(checkpoint.load_rank_data(resume_path))
    state.step, state.tokens_seen = saved["step"], saved["tokens_seen"]
    state.skipped_steps = saved.get("skipped_steps", 0)
    state.consecutive_skips = saved.get("consecutive_skips", 0)
    dist.print0(f"resumed from {resume_path} at step {state.step}")
    changes = apply_train_settings(run.engine, cfg.train)
    for name, engine in run.objective.extra_engines().items():
        changes += [f"{name} {c}" for c in apply_train_settings(engine, getattr(engine, "llmtrain_train", cfg.train))]
    if changes:
        dist.print0(f"resume: from step {state.step} on, the recipe's settings apply: {', '.join(changes)}")


def run_task(cfg: Config, objective: Objective) -> Run:
    run = setup(cfg, objective)
    try:
        final = os.path.join(cfg.output_dir, "final")
        # final/ of this very step (a failed export keeps the older final/: export again then)
        if run.state.step >= cfg.train.max_steps and export.exported_step(final) == run.state.step:
            dist.print0(f"{cfg.output_dir}: already trained to train.max_steps={cfg.train.max_steps}; nothing to do")
            return run
        train_loop(run)
        export.export_hf(run.engine, run.tokenizer, final, run.stage, cfg.dist.wait_minutes, step=run.state.step,
                         stale_minutes=cfg.dist.stale_minutes)
        for name, engine in run.objective.extra_engines().items():  # e.g. PPO's critic: final/critic/
            export.export_hf(engine, run.tokenizer, os.path.join(final, name), run.stage, cfg.dist.wait_minutes,
                             step=run.state.step, stale_minutes=cfg.dist.stale_minutes, marker_dir=cfg.output_dir)
        plots.write_curves(cfg.output_dir)  # rank 0: output_dir/curves.png, or a line saying why there is none
        dist.print0(f"done: {os.path.join(cfg.output_dir, 'final')}")
    finally:
        run.logger.close()
    return run
