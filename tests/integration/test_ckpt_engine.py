"""ckpt_engine: the wrapper around DeepSpeed's checkpoint engine keeps the engine's own behaviour
(every CheckpointEngine method reaches it), refuses asynchronous engines with one line, and every
resume load, the RNG files included, refuses to unpickle code with one line."""
from __future__ import annotations

import inspect
import json
import os

import pytest
import torch

from conftest import BIN, REPO, base_recipe, free_port, read_metrics, run_cmd, write_recipe
from llmtrain.train import checkpoint, ckpt_engine
from llmtrain.config import ConfigError


def _engine_classes():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return CheckpointEngine, TorchCheckpointEngine


def _overriding_engine(decoupled: bool = False):
    """DeepSpeed's real TorchCheckpointEngine with every overridable answer changed, calls recorded."""
    _, TorchCheckpointEngine = _engine_classes()

    class Overriding(TorchCheckpointEngine):
        def __init__(self):
            super().__init__(None)
            self.calls = []

        def is_data_parallel_writer(self, dp_rank):
            self.calls.append(("is_data_parallel_writer", dp_rank))
            return dp_rank == 3  # the base says dp_rank == 0

        def is_decoupled(self):
            self.calls.append(("is_decoupled",))
            return decoupled

        def set_commit_info(self, info):
            self.calls.append(("set_commit_info", info))

        def get_commit_info(self):
            self.calls.append(("get_commit_info",))
            return "commit-info"  # the base says None

        def cleanup(self):
            self.calls.append(("cleanup",))

        def preserves_storage_sharing(self):
            self.calls.append(("preserves_storage_sharing",))
            return False  # the base says True

    return Overriding()


def test_wrapper_forwards_every_checkpoint_engine_method_to_the_engine_it_wraps():
    inner = _overriding_engine()
    safe = ckpt_engine.SafeCheckpointEngine(inner)
    assert safe.is_data_parallel_writer(3) is True and safe.is_data_parallel_writer(0) is False
    assert safe.is_decoupled() is False
    assert safe.get_commit_info() == "commit-info"
    assert safe.preserves_storage_sharing() is False
    safe.set_commit_info("x")
    safe.cleanup()
    assert [c[0] for c in inner.calls] == ["is_data_parallel_writer", "is_data_parallel_writer", "is_decoupled",
                                           "get_commit_info", "preserves_storage_sharing", "set_commit_info", "cleanup"]
    # a method DeepSpeed adds to CheckpointEngine later must be forwarded too, or this fails
    CheckpointEngine, _ = _engine_classes()
    methods = {n for n, f in inspect.getmembers(CheckpointEngine, inspect.isfunction) if not n.startswith("_")}
    missing = methods - set(vars(ckpt_engine.SafeCheckpointEngine))
    assert not missing, f"SafeCheckpointEngine inherits (and so hides the inner engine's) {sorted(missing)}"


def test_a_decoupled_engine_is_refused_with_one_line_and_its_writer_stopped():
    inner = _overriding_engine(decoupled=True)

    class FakeDeepSpeedEngine:  # only the attribute install() replaces; the engine itself is not under test
        checkpoint_engine = inner

        def _copy_recovery_script(self, save_path):
            pass

    with pytest.raises(ConfigError, match="asynchronously") as e:
        ckpt_engine.install(FakeDeepSpeedEngine())
    assert "\n" not in str(e.value) and ("cleanup",) in inner.calls


def _writer_run(tmp_path, tiny_model_dir, name: str, writer: dict, max_steps: int, **train) -> tuple[str, str]:
    ds = tmp_path / f"{name}.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "checkpoint": {"writer": writer}}))
    recipe = base_recipe(tmp_path / name, tiny_model_dir, max_steps=max_steps, **train)
    recipe["deepspeed"]["config"] = str(ds)
    os.makedirs(tmp_path / name, exist_ok=True)
    return write_recipe(tmp_path / name / "r.yaml", recipe), recipe["output_dir"]


def _torchrun(recipe: str, *overrides: str):
    # DeepSpeed's writer engines read CROSS_RANK/CROSS_SIZE, which its own launcher sets (torchrun does not)
    cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", "1", "--master_port", str(free_port()),
           os.path.join(REPO, "launch/sft.py"), "--recipe", recipe, *overrides]
    return run_cmd(cmd, timeout=300, env={"CROSS_RANK": "0", "CROSS_SIZE": "1"})


def test_deepspeed_decoupled_writer_is_refused_with_one_line_before_training(tmp_path, tiny_model_dir):
    """DeepSpeed's real DecoupledCheckpointEngine (python writer, CPU): refused at engine start."""
    recipe, out = _writer_run(tmp_path, tiny_model_dir, "decoupled",
                              {"type": "python", "decoupled": True, "data_parallel": "replica"}, max_steps=2,
                              save_every=1)
    proc = _torchrun(recipe)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "DecoupledCheckpointEngine" in errors[0] and '"decoupled": false' in errors[0]
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))  # refused before the first step
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_00000001"))


def test_deepspeed_fast_writer_checkpoint_resumes_to_the_uninterrupted_losses(tmp_path, tiny_model_dir):
    """DeepSpeed's real FastCheckpointEngine (python writer, CPU) writes through the wrapper; its files
    load weights-only and the resumed step equals the uninterrupted one."""
    writer = {"type": "python", "data_parallel": "replica", "show_statistics": True}  # the writer prints each file
    recipe, out = _writer_run(tmp_path, tiny_model_dir, "fast", writer, max_steps=3, save_every=2)
    proc = _torchrun(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stats = " in proc.stdout and "optim_states.pt" in proc.stdout  # DeepSpeed's writer wrote the shards
    uninterrupted = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    ckpt = os.path.join(out, "checkpoints", "step_00000002")
    assert checkpoint.is_complete(ckpt)
    proc = _torchrun(recipe, f"output_dir={tmp_path / 'resumed'}", f"train.resume={ckpt}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = {r["step"]: r["loss"] for r in read_metrics(str(tmp_path / "resumed")) if "loss" in r}
    assert list(resumed) == [3] and resumed[3] == pytest.approx(uninterrupted[3], rel=1e-6)


class Evil:
    """Unpickling this creates a file: proof that a load ran code."""

    def __init__(self, sentinel: str):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_an_rng_file_that_needs_unpickling_is_refused_with_one_line(tmp_path):
    ckpt = tmp_path / "step_00000002"
    os.makedirs(ckpt / "rng")
    sentinel = tmp_path / "code-ran"
    state = checkpoint.rng_state()
    state["python"] = Evil(str(sentinel))
    torch.save(state, ckpt / "rng" / "rank_0.pt")
    with pytest.raises(ConfigError, match="refusing to unpickle") as e:
        checkpoint.restore_rng(str(ckpt), seed=1, step=2, saved_world=1)
    assert "\n" not in str(e.value) and "rank_0.pt" in str(e.value)
    assert not sentinel.exists()
