"""A pure-PyTorch stand-in for the `vllm` package: just the API surface llmtrain's vllm backend calls
(objectives/rl/vllm_backend.py), on top of a Hugging Face model, so its CPU tests run every line of
our code on that path. Put tests/integration/fake_vllm on PYTHONPATH to make `import vllm` find it.

Strict where a real engine would be: unknown constructor/sampling arguments fail, load_weights takes
only checkpoint names of the model (KeyError otherwise, as vLLM's loaders do), sleep(level=2)
discards the weights (NaN) so a generate without a fresh sync shows, generate while asleep fails,
and a prompt + max_tokens beyond max_model_len fails. Events go to $FAKE_VLLM_LOG (JSON lines) and,
after each generate, the weights to $FAKE_VLLM_DUMP/rank<R>.safetensors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

__version__ = "0.0+fake"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _event(kind: str, **data) -> None:
    path = os.environ.get("FAKE_VLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"event": kind, "rank": int(os.environ.get("RANK", 0)), **data}) + "\n")


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    stop_token_ids: list = field(default_factory=list)
    seed: int | None = None
    detokenize: bool = True


@dataclass
class CompletionOutput:
    index: int
    token_ids: list
    finish_reason: str  # "stop" | "length"
    stop_reason: int | None = None
    text: str = ""


@dataclass
class RequestOutput:
    prompt_token_ids: list
    outputs: list


class _Model:
    """What llm_engine.model_executor.driver_worker.model_runner.model is: load_weights((name, tensor)...)."""

    def __init__(self, hf):
        self.hf = hf
        self.params = dict(hf.named_parameters())
        self.loaded = 0

    def load_weights(self, weights):
        names = set()
        with torch.no_grad():
            for name, tensor in weights:
                if name not in self.params:
                    raise KeyError(f"fake vllm: no parameter {name!r} in the model")
                dst = self.params[name]
                if tuple(dst.shape) != tuple(tensor.shape):
                    raise ValueError(f"fake vllm: {name}: shape {tuple(tensor.shape)} != {tuple(dst.shape)}")
                dst.copy_(tensor)
                names.add(name)
        self.loaded += len(names)
        _event("load_weights", names=sorted(names))
        return names


class LLM:
    def __init__(self, model: str, *, revision=None, trust_remote_code=False, dtype="auto", tensor_parallel_size=1,
                 gpu_memory_utilization=0.9, max_model_len=None, enable_sleep_mode=False,
                 distributed_executor_backend=None, seed=0, skip_tokenizer_init=False):
        from transformers import AutoModelForCausalLM

        assert tensor_parallel_size == 1 and 0 < gpu_memory_utilization <= 1
        hf = AutoModelForCausalLM.from_pretrained(model, revision=revision, dtype=_DTYPES.get(dtype, torch.float32),
                                                  trust_remote_code=trust_remote_code).eval()
        self.model = _Model(hf)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(
            driver_worker=SimpleNamespace(model_runner=SimpleNamespace(model=self.model))))
        self.max_model_len, self.sleep_enabled = max_model_len, enable_sleep_mode
        self.weights_awake = self.kv_awake = True
        _event("init", model=model, dtype=dtype, max_model_len=max_model_len, sleep=enable_sleep_mode,
               backend=distributed_executor_backend, skip_tokenizer_init=skip_tokenizer_init)

    def sleep(self, level: int = 1) -> None:
        assert self.sleep_enabled, "sleep() needs enable_sleep_mode=True"
        if level == 2:
            with torch.no_grad():
                for p in self.model.params.values():
                    p.fill_(float("nan"))  # level 2 discards the weights
        self.weights_awake = self.kv_awake = False
        _event("sleep", level=level)

    def wake_up(self, tags=None) -> None:
        tags = tags or ["weights", "kv_cache"]
        self.weights_awake |= "weights" in tags
        self.kv_awake |= "kv_cache" in tags
        _event("wake_up", tags=list(tags))

    def reset_prefix_cache(self) -> bool:
        _event("reset_prefix_cache")
        return True

    @torch.no_grad()
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        assert self.weights_awake and self.kv_awake, "generate on a sleeping engine"
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        assert len(params) == len(prompts)
        outs = [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]
        _event("generate", requests=len(prompts), samples=sum(len(o.outputs) for o in outs),
               greedy=all(sp.temperature == 0 for sp in params))
        dump = os.environ.get("FAKE_VLLM_DUMP")
        if dump:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in self.model.hf.state_dict().items()},
                      os.path.join(dump, f"rank{os.environ.get('RANK', 0)}.safetensors"))
        return outs

    def _one(self, prompt: list, sp: SamplingParams) -> RequestOutput:
        if self.max_model_len is not None and len(prompt) + sp.max_tokens > self.max_model_len:
            raise ValueError(f"fake vllm: prompt {len(prompt)} + max_tokens {sp.max_tokens} > max_model_len "
                             f"{self.max_model_len}")
        ids = torch.tensor([prompt])
        kw = dict(max_new_tokens=sp.max_tokens, eos_token_id=list(sp.stop_token_ids), pad_token_id=0,
                  use_cache=True)
        if sp.temperature == 0:
            rows = self.model.hf.generate(input_ids=ids, do_sample=False, **kw)
        else:
            with torch.random.fork_rng():  # vLLM's own RNG: per-request seed
                torch.manual_seed(sp.seed if sp.seed is not None else 0)
                rows = self.model.hf.generate(input_ids=ids, do_sample=True, temperature=sp.temperature,
                                              top_p=sp.top_p, top_k=0, num_return_sequences=sp.n, **kw)
        outputs = []
        for i, row in enumerate(rows[:, len(prompt):].tolist()):
            stop = next((j for j, t in enumerate(row) if t in sp.stop_token_ids), None)
            toks = row if stop is None else row[: stop + 1]  # vLLM keeps the stop token in token_ids
            outputs.append(CompletionOutput(index=i, token_ids=toks, finish_reason="length" if stop is None else "stop",
                                            stop_reason=None if stop is None else toks[-1]))
        return RequestOutput(prompt_token_ids=prompt, outputs=outputs)
