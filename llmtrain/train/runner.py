"""Wire a run together: config -> dist -> tokenizer -> data -> model -> engine -> resume -> loop -> export.

`main(task_name)` is what launch/<task>.py calls. User mistakes (ConfigError, DataError)
end as one line on stderr and exit status 2, with no traceback; a checkpoint or final/ that
cannot be written (full disk) as one line and exit status 5.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from . import checkpoint, dist, export, fastpaths, plots, preflight, universal
from .config import Config, ConfigError, load_config, save_resolved
from .data.sources import DataError
from .loop import NonFiniteError, RunState, train_loop
from .signals import PREEMPTED_EXIT_CODE, Preempted, requeue_slurm_job
from .waiting import OtherRankFailed


def parse_args(argv: Optional[list[str]], description: str) -> tuple[Optional[str], list[str]]:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=10")
    args = p.parse_args(argv)
    return args.recipe, args.overrides


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
    cfg: Config
    info: Any
    task: Any
    tokenizer: Any
    tok_hash: str
    data: Any
    engine: Any
    stage: int
    ds_config: dict
    precision: str
    logger: Any
    state: RunState
    data_state: Optional[dict] = None  # data position after the last trained step (the loop prefetches ahead)

    def trainer_state(self) -> dict:
        t = self.cfg.train
        return {
            "step": self.state.step,
            "tokens_seen": self.state.tokens_seen,
            "skipped_steps": self.state.skipped_steps,
            "consecutive_skips": self.state.consecutive_skips,
            "data": self.data_state if self.data_state is not None else self.data.state_dict(),
            "tokenizer_hash": self.tok_hash,
            "global_batch": t.micro_batch_size * t.grad_accum * self.info.world_size,
            "world_size": self.info.world_size,
            "task": self.task.name,
        }

    def save_checkpoint(self) -> None:
        path = checkpoint.save(self.engine, self.cfg, self.trainer_state())
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


def setup(cfg: Config, task) -> Run:
    from . import engine as eng
    from .metrics import make_logger
    from .models import count_parameters, load_model, load_tokenizer, tokenizer_hash

    info = dist.init(cfg.dist.timeout_minutes, cfg.dist.backend)
    for line in cfg.notices:  # values adjusted while loading (e.g. warmup clamped to max_steps)
        dist.print0(line)
    preflight.run(cfg, info)  # same config/code/tokenizer/data on every rank; rank table; link bandwidth
    seed_everything(cfg.train.seed)
    resume_path = checkpoint.find_resume(cfg)
    check_output_dir(cfg, resuming=resume_path is not None)
    if resume_path is not None:
        check_resume_step(cfg, resume_path)
    if info.is_main:
        if cfg.overwrite_output_dir and resume_path is None:
            for sub in ("checkpoints", "final", "cache"):  # asked for explicitly: the old run goes
                shutil.rmtree(os.path.join(cfg.output_dir, sub), ignore_errors=True)
        os.makedirs(cfg.output_dir, exist_ok=True)
        save_resolved(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        checkpoint.write_run_id(cfg.output_dir, fresh=resume_path is None)  # checkpoints carry it (universal.py)
    dist.barrier()

    tokenizer = load_tokenizer(cfg)
    tok_hash = tokenizer_hash(tokenizer)
    ds_config = eng.build_ds_config(cfg, info.world_size, info.device)
    precision = eng.resolve_precision(cfg, info.device)
    data = task.build_data(cfg, tokenizer, info, tok_hash)
    if resume_path is not None and eng.zero_stage(ds_config) > 0:
        saved_world = checkpoint.saved_state(resume_path).get("world_size", info.world_size)
        if saved_world != info.world_size:
            # ZeRO partitions optimizer state by rank: go through DeepSpeed's universal format
            dist.print0(f"resume: checkpoint written by {saved_world} rank(s), now {info.world_size}: "
                        "loading it through a universal checkpoint")
            resume_path = universal.prepare(cfg, resume_path)  # rank 0 converts; the others poll, no collective
            ds_config["checkpoint"] = {"load_universal": True}
    model = load_model(cfg, tokenizer, ds_config, precision, info.device)
    model = fastpaths.apply_fast_paths(model, cfg, info.device)  # model.liger / model.compile (explicit switches)
    trainable, total = count_parameters(model)
    engine, _ = eng.initialize(model, cfg, ds_config)
    stage = eng.zero_stage(ds_config)
    dist.print0(
        f"llmtrain {task.name}: {info.world_size} rank(s) via {info.launcher}, {info.device.type}/{info.backend}, "
        f"ZeRO-{stage}, {precision}{eng.accumulation_note(engine, cfg.train, precision)}, "
        f"params {total:,} ({trainable:,} trainable), "
        f"global batch {cfg.train.micro_batch_size * cfg.train.grad_accum * info.world_size} "
        f"{'packed rows' if cfg.data.packing else 'sequences'} of <= {cfg.data.max_seq_len} tokens"
    )

    state = RunState()
    run = Run(cfg, info, task, tokenizer, tok_hash, data, engine, stage, ds_config, precision, None, state)
    if hasattr(task, "prepare"):
        task.prepare(run)  # e.g. DPO's reference: before a resume overwrites the starting weights
    if resume_path is not None:
        resume(run, resume_path)
    run.logger = make_logger(cfg, info.is_main, state.step)
    return run


def resume(run: Run, resume_path: str) -> None:
    """Model, optimizer, scheduler, RNG, data position and counters from the checkpoint; then the
    recipe's schedule and optimizer settings, which may differ from the checkpoint's."""
    from . import engine as eng

    cfg, state = run.cfg, run.state
    saved = checkpoint.load(run.engine, resume_path, cfg.train.seed)
    check_resume_identity(cfg, saved, run.trainer_state())
    run.data.load_state_dict(saved["data"])
    state.step, state.tokens_seen = saved["step"], saved["tokens_seen"]
    state.skipped_steps = saved.get("skipped_steps", 0)
    state.consecutive_skips = saved.get("consecutive_skips", 0)
    dist.print0(f"resumed from {resume_path} at step {state.step}")
    changes = eng.apply_train_settings(run.engine, cfg.train)
    if changes:
        dist.print0(f"resume: from step {state.step} on, the recipe's settings apply: {', '.join(changes)}")


def run_task(cfg: Config, task) -> Run:
    run = setup(cfg, task)
    try:
        final = os.path.join(cfg.output_dir, "final")
        # final/ of this very step (a failed export keeps the older final/: export again then)
        if run.state.step >= cfg.train.max_steps and export.exported_step(final) == run.state.step:
            dist.print0(f"{cfg.output_dir}: already trained to train.max_steps={cfg.train.max_steps}; nothing to do")
            return run
        train_loop(run)
        export.export_hf(run.engine, run.tokenizer, final, run.stage, cfg.dist.wait_minutes, step=run.state.step)
        plots.write_curves(cfg.output_dir)  # rank 0: output_dir/curves.png; a failure only warns
        dist.print0(f"done: {os.path.join(cfg.output_dir, 'final')}")
    finally:
        run.logger.close()
    return run


def main(task_name: str, argv: Optional[list[str]] = None) -> int:
    """Run a task; return the exit status (0 done, 2 user error, 3 preempted, 4 non-finite, 5 storage)."""
    from .tasks import TASKS

    try:
        recipe, overrides = parse_args(argv, f"llmtrain {task_name}")
        cfg = load_config(recipe, overrides)
        run_task(cfg, TASKS[task_name]())
        code = 0
    except Preempted as e:
        dist.print0(f"stopped: {e}; resume with train.resume=auto")
        if cfg.train.requeue_on_signal and dist.is_main():
            requeue_slurm_job()
        code = PREEMPTED_EXIT_CODE
    except NonFiniteError as e:
        if dist.is_main():
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = 4
    except (ConfigError, DataError, checkpoint.StorageError) as e:
        if dist.launcher_rank() == 0:  # each rank raises the same error: one line (mpirun sets no RANK)
            print(f"error: {e}", file=sys.stderr, flush=True)
        code = getattr(e, "exit_code", 2)
    except OtherRankFailed as e:  # rank 0 printed its line; this rank ends with the same status
        code = e.exit_code
    return dist.finish(code)
