"""How llmtrain reads and writes DeepSpeed checkpoint files: loads without pickle, writes whose
failures are recorded instead of raised.

Loads. A checkpoint path can come from anywhere (train.resume), and unpickling a file can run
code. DeepSpeed 0.19.8 unpickles on every resume path:
  - normal resume, ZeRO 0-3: model states and ZeRO optimizer shards go through the engine's
    checkpoint engine, `TorchCheckpointEngine.load` (torch.load(weights_only=False));
  - universal conversion (deepspeed/checkpoint/ds_to_universal.py, deepspeed_checkpoint.py,
    zero_checkpoint.py): torch.load(weights_only=False) on every model and optimizer file;
  - universal load: model states through the checkpoint engine; zero/optimizer_state.pt in
    base_optimizer.load_hp_checkpoint_state_from_checkpoint_dir (ZeRO 1-2) and
    stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3 (ZeRO-3), and every
    zero/<param>/<key>.pt in universal_checkpoint.load_hp_checkpoint_state (ZeRO 1-2) and
    stage3.load_hp_checkpoint_state (ZeRO-3): all torch.load(weights_only=False).
We replace the checkpoint engine's load by torch.load(weights_only=True) and run the direct loads
(and the converter) under torch's own TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, which overrides an
explicit weights_only=False. Only tensors, containers, numbers, strings and the few plain DeepSpeed
classes in SAFE_GLOBALS unpickle; anything else is refused with one line.

Writes. DeepSpeed's save_checkpoint writes through the checkpoint engine between collectives; a
failed write (a full disk: "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected
pos") raises on the ranks that hit it while the others wait in the next barrier. The engine here
records the failure, skips this rank's remaining writes and lets every rank run the same
collectives to the end, so that checkpoint.save can agree on the outcome and clean up.

Engines. DeepSpeed picks its checkpoint engine from the JSON's "checkpoint" block: TorchCheckpointEngine
(default), FastCheckpointEngine ("writer": {...}, synchronous, DeepNVMe/aio writers on GPU nodes),
DecoupledCheckpointEngine ("writer": {"decoupled": true}) or DataStatesCheckpointEngine ("datastates").
The wrapper hands every CheckpointEngine method it does not change (writer election, commit info,
cleanup, storage sharing) to the engine it wraps. Decoupled engines are refused with one line: their
writes finish in a background process after the next optimizer step, so a failed write would go
unseen and COMPLETE (checkpoint.py) would be written before the files are on disk.
"""
from __future__ import annotations

import contextlib
import os
import pickle

import torch

from ..errors import ConfigError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def register_safe_globals() -> None:
    """The plain DeepSpeed classes its checkpoint states hold (besides tensors and containers)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


def refusal(path: str, e: BaseException) -> ConfigError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ConfigError(f"train.resume: {path} holds objects outside the safe list ({first}); refusing to unpickle it")


@contextlib.contextmanager
def weights_only_loads(where: str = "a checkpoint file"):
    """Every torch.load inside runs with weights_only=True, whatever its caller asked for (torch's own
    switch, read per call). Process-wide while it lasts: used around a resume, before training
    threads start."""
    register_safe_globals()
    before = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        yield
    except pickle.UnpicklingError as e:
        raise refusal(where, e) from None
    finally:
        if before is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = before


def _checkpoint_engine_base():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    return CheckpointEngine


def check_supported(inner, where: str = "the DeepSpeed config") -> None:
    """Refuse (one line) a checkpoint engine whose writes complete asynchronously; stop its writer process."""
    if not inner.is_decoupled():
        return
    name = getattr(inner, "name", None) or type(inner).__name__
    try:
        inner.cleanup()  # DecoupledCheckpointEngine started a writer process at engine init
    except Exception:  # noqa: BLE001 - refusing anyway
        pass
    raise ConfigError(
        f"{where}: DeepSpeed's {name} writes checkpoints asynchronously (in another process, finished after the next "
        "step), so llmtrain could neither see a failed write nor mark a checkpoint COMPLETE only once it is on disk; "
        'set "checkpoint": {"writer": {"decoupled": false}} (the same writer, synchronous) or drop the writer block')


class SafeCheckpointEngine(_checkpoint_engine_base()):
    """Wraps the engine DeepSpeed configured (keeps its serialization and writer settings): weights-only
    loads, recorded write failures. `errors` lists (path, one-line reason) of this rank's failed writes.

    Every method of CheckpointEngine is defined here: Python finds the base class's defaults before
    __getattr__, so a method merely inherited would hide the inner engine's override (FastCheckpointEngine's
    writer election, DataStates' storage sharing). tests/test_ckpt_engine.py checks the list is complete."""

    def __init__(self, inner):
        self.inner = inner
        self.name = getattr(inner, "name", "SafeCheckpointEngine")
        self.errors: list[tuple[str, str]] = []

    def __getattr__(self, attr):  # attributes of the inner engine (its writer, config...)
        if attr == "inner":  # not set yet (unpickling, copy): never recurse
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    # --- handed to the inner engine unchanged ---
    def create(self, info):
        return self.inner.create(info)

    def commit(self, info):
        return self.inner.commit(info)

    def is_data_parallel_writer(self, dp_rank):
        return self.inner.is_data_parallel_writer(dp_rank)

    def is_decoupled(self):
        return self.inner.is_decoupled()

    def set_commit_info(self, info):
        return self.inner.set_commit_info(info)

    def get_commit_info(self):
        return self.inner.get_commit_info()

    def cleanup(self):
        return self.inner.cleanup()

    def preserves_storage_sharing(self):
        return self.inner.preserves_storage_sharing()

    # --- changed: failures recorded, loads weights-only ---

    def _record(self, path: str, e: BaseException) -> None:
        from ..distributed.waiting import one_line

        self.errors.append((path, one_line(e)))

    def makedirs(self, path, exist_ok=False):
        if self.errors:
            return
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self._record(path, e)

    def save(self, state_dict, path: str):
        if self.errors:  # this checkpoint already failed here: write nothing more
            return
        try:
            self.inner.save(state_dict, path)
        except (OSError, RuntimeError) as e:  # torch.save on a full disk raises RuntimeError
            self._record(path, e)

    def load(self, path: str, map_location=None):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            raise refusal(path, e) from None


def install(engine) -> SafeCheckpointEngine:
    """Put a fresh SafeCheckpointEngine on `engine` (errors cleared), wrapping DeepSpeed's own once.
    Also records a failure of DeepSpeed's copy of zero_to_fp32.py into the checkpoint root (rank 0,
    outside the checkpoint engine), which would otherwise raise on rank 0 alone."""
    register_safe_globals()
    inner = engine.checkpoint_engine
    if isinstance(inner, SafeCheckpointEngine):
        inner = inner.inner
    check_supported(inner)
    safe = SafeCheckpointEngine(inner)
    engine.checkpoint_engine = safe
    original = type(engine)._copy_recovery_script

    def copy_recovery_script(save_path):
        try:
            original(engine, save_path)
        except OSError as e:
            engine.checkpoint_engine._record(save_path, e)

    engine._copy_recovery_script = copy_recovery_script  # instance attribute shadows the method
    return safe
