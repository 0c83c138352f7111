"""The task protocol: everything that differs between tasks, and nothing else.

The runner and the one loop (llmtrain/train/) know no task by name; they drive an `Objective`:

    objective = OBJECTIVES[command].from_config(cfg)    # picks the config sections it uses
    data = objective.build_data(ctx)                     # every rank: prepare/open train + eval data
    model = models.load_model(..., head=objective.head)
    objective.prepare_model(model)                       # then the DeepSpeed engine
    objective.setup(run)                                 # engine exists; a resume has not loaded weights yet
    objective.extra_engines()                            # saved in each checkpoint, exported to final/<name>/
    for each micro-batch of each step (train/loop.py):
        loss, sums = objective.loss(engine, batch, plan.global_weight)
    at eval steps:
        row = objective.evaluate(engine, eval_set, device)

`llmtrain prepare --task T` calls `OBJECTIVES[T].from_config(cfg).prepare_data(ctx, opts)`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import torch

from .. import distributed as dist
from ..config import Config
from ..data.protocol import DataContext, EvalSet, TrainData, to_device
from ..distributed.mesh import replica_count
from ..data.shards.recipe import PrepareOptions


class RunContext(Protocol):
    """What `Objective.setup` sees of the run (train/runner.Run provides it)."""

    engine: Any  # the DeepSpeed engine: engine(**inputs) forwards, engine.module is the model
    data: TrainData  # what build_data returned
    info: Any  # distributed.DistInfo of this rank
    ds_config: dict  # the DeepSpeed config the engine was built with
    tokenizer: Any  # the run's tokenizer (model.tokenizer or the model's own)

    def load_model(self, ds_config: dict, name_or_path: Any = None, head: Any = None) -> torch.nn.Module:
        """The starting model once more (same source, seed, head, LoRA and precision), e.g. a frozen reference;
        with name_or_path / head another model loaded the same way (e.g. PPO's critic)."""

    def new_engine(self, model: torch.nn.Module, t: Any, ds_config: dict) -> Any:
        """A second trainable engine (train/engine.EngineAdapter: backward, step(boundary), step_skipped)
        with its own optimizer and the LR schedule of TrainConfig t (e.g. PPO's critic)."""


class Objective(ABC):
    """A task: its data and its loss (DESIGN.md 2). Subclasses set `name` and implement the abstract methods."""

    name: ClassVar[str]  # the command (`llmtrain sft`, launch/sft.py) and trainer_state.json's "task"
    summary: ClassVar[str]  # one line for `llmtrain --help`
    head: ClassVar[str] = "causal_lm"  # the model head models.load_model builds (models.loading.HEADS)
    # parallel.sequence_parallel_size / tensor_parallel_size > 1 tested for this task (SP shards its
    # rows in lm_forward, TP needs its loss divided in the loop); False: refused with one line
    model_parallel: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: Config) -> "Objective":
        """The objective with the config sections it uses (it keeps nothing else of the recipe)."""

    @abstractmethod
    def build_data(self, ctx: DataContext) -> TrainData:
        """Train (and eval) data for the loop; collective: every rank calls it at the same point."""

    @abstractmethod
    def prepare_data(self, ctx: DataContext, opts: PrepareOptions) -> None:
        """Tokenize the recipe's data once, ahead of any run, where `build_data` will find it (`llmtrain prepare`)."""

    def prepare_model(self, model: torch.nn.Module) -> None:
        """After the model is loaded (LoRA-wrapped, partitioned under ZeRO-3) and before the engine takes its
        weights (e.g. the reward model's zeroed head): the optimizer's master copy is made from these."""

    def setup(self, run: RunContext) -> None:
        """After the engine is built and before a resume loads weights (e.g. DPO's reference model)."""

    def extra_engines(self) -> dict[str, Any]:
        """{name: DeepSpeed engine} of further trained models (e.g. PPO's critic): each checkpoint holds
        their state in <checkpoint>/<name>/ (resumed with it), and final/<name>/ their export."""
        return {}

    @abstractmethod
    def loss(self, engine, batch: dict, global_weight: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(this micro-batch's share of the step loss, already divided by the step's global normaliser,
        detached per-micro-batch sums the loop all-reduces and divides by global_weight on log steps)."""

    def evaluate(self, engine, eval_set: EvalSet, device: torch.device) -> dict[str, float]:
        """Loss (and the loss's metric sums) over the whole eval set, all ranks, normalised like training."""
        engine.eval()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        sums: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for batch in eval_set.batches:
                loss, batch_sums = self.loss(engine, to_device(batch, device), eval_set.global_weight)
                loss_sum += loss.double()
                for k, v in batch_sums.items():
                    sums[k] = sums.get(k, 0) + v.double()
        engine.train()
        names = sorted(sums)
        totals = (dist.all_reduce_sum(torch.stack([loss_sum] + [sums[k] for k in names])) / replica_count()).tolist()
        out = {"eval_loss": totals[0]}
        out.update({f"eval_{k}": v / max(eval_set.global_weight, 1) for k, v in zip(names, totals[1:])})
        return out
