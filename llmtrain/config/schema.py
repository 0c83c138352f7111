"""The recipe's typed sections: every field a user can set, with its unit and meaning.

Each component takes the section it uses (TrainConfig, DataConfig, LoraConfig, ...); only the
runner holds the whole `Config`. Loading and validation: config/loading.py, config/validation.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union


@dataclass
class Section:
    """Base of every recipe section: `where(key)` says where a dotted key was set (file:line or
    override), so a component holding only its section still names the line in its errors."""

    origins: dict = field(default_factory=dict, repr=False, compare=False, kw_only=True)  # dotted key -> file:line

    def where(self, key: str) -> str:
        return self.origins.get(key, key)

# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig(Section):
    name_or_path: Optional[str] = None  # HF hub id or local model directory; absent: build from `config`
    config: Optional[dict] = None  # from-scratch architecture: {model_type: llama, hidden_size: ..., ...}
    tokenizer: Optional[str] = None  # tokenizer hub id / directory; default: name_or_path
    revision: Optional[str] = None  # hub revision (branch, tag or commit) for name_or_path
    trust_remote_code: bool = False  # run model code shipped with a hub repo (only if you trust it)
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2 (auto: flash-attn on CUDA if installed)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    chat_template: Optional[str] = None  # jinja template or path to a .jinja file; default: the tokenizer's, else ChatML
    liger: bool = False  # (GPU) Liger fused kernels; requires liger-kernel
    compile: bool = False  # torch.compile the model


@dataclass
class SourceConfig:
    path: str  # file, glob or saved HF dataset directory (pretrain: a prepared token-shard directory)
    format: str = "auto"  # auto | messages | sharegpt | alpaca | preference | text | shards
    weight: float = 1.0  # relative sampling weight when several sources are mixed
    text_field: str = "text"  # column holding raw text (format: text; pretrain: read by launch/prepare.py)
    # pretrain: raw files/globs/dataset dirs (or a hub dataset) that `launch/prepare.py` tokenizes
    # into the shard directory `path` (absent: `path` is already prepared)
    prepare_from: Optional[Union[str, list]] = None
    # hub datasets (a hub id such as HuggingFaceH4/ultrachat_200k, or a local folder laid out like a
    # hub dataset repository), read with datasets.load_dataset; pretrain: these describe prepare_from
    name: Optional[str] = None  # subset (load_dataset's `name`, the dataset card's config_name)
    split: Optional[str] = None  # split to read (default: train); also picks a split of a saved DatasetDict
    revision: Optional[str] = None  # hub branch, tag or commit: pin it so a rerun reads the same rows
    columns: Optional[dict] = None  # {our field: dataset column}, e.g. {messages: conversation}
    streaming: bool = False  # pretrain prepare_from only: stream the hub dataset instead of downloading it first


@dataclass
class DataConfig(Section):
    train: list = field(default_factory=list)  # training sources: paths/globs/dataset dirs or {path, format, weight}
    eval: list = field(default_factory=list)  # held-out sources, same form; empty: none (or eval_fraction)
    eval_fraction: float = 0.0  # share of train rows held out for eval when `eval` is empty (0 = no eval split)
    max_seq_len: int = 2048  # tokens per sample (unpacked) or per row (packed)
    packing: bool = False  # padding-free packing: several samples per row, position_ids restart per sample
    truncation: Literal["truncate", "drop"] = "truncate"  # what to do with a sample longer than max_seq_len
    max_bad_fraction: float = 0.001  # share of malformed rows skipped (and reported) before the run aborts
    max_prompt_len: int = 1024  # DPO: a longer prompt (tokens, template included) is skipped and counted
    train_reasoning: bool = True  # train assistant reasoning (reasoning_content / <think>) where the template renders it
    template_date: str = "2024-07-26"  # "today" for chat templates that print the date (Llama 3.x, gpt-oss): fixed
    # SFT/DPO preparation (tokenization into memory-mapped chunks, once, reused by later runs)
    cache_dir: Optional[str] = None  # prepared data; default output_dir/cache; content-keyed, safe to share between runs
    prepare_workers: int = 0  # tokenizer processes per rank (0 = this rank's share of the node's CPUs)
    prepare_chunk_rows: int = 4096  # most rows per chunk (the unit of parallel work, resume and atomic writes)
    # total cap on a rank's wait for chunks other (live) ranks are preparing; 0 = no cap; a rank that died
    # holding chunks is caught sooner, by dist.stale_minutes
    prepare_timeout_minutes: float = 1440.0


@dataclass
class TrainConfig(Section):
    max_steps: int = 100  # optimizer steps to run; the LR schedule is defined over them
    seed: int = 42  # one seed for init, data order and dropout
    micro_batch_size: int = 1  # sequences (or packed rows) per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-5  # peak learning rate
    min_lr_ratio: float = 0.1  # final LR as a fraction of `lr` (cosine / linear schedules)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to `lr` (above max_steps: clamped to it, with a notice)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.95  # AdamW second-moment decay
    adam_eps: float = 1e-8  # AdamW denominator epsilon
    max_grad_norm: float = 1.0  # global gradient-norm clip (0 = no clipping)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    save_every: int = 0  # checkpoint interval in optimizer steps (0 = only at the end)
    keep_last: int = 2  # checkpoints kept; older complete ones are deleted (newest is never deleted)
    eval_every: int = 0  # eval interval in optimizer steps (0 = never; an eval also runs at the end if eval data)
    eval_max_batches: int = 0  # micro-batches per rank per eval (0 = the whole eval set)
    log_every: int = 1  # optimizer steps between metrics rows (each log step syncs the device once)
    resume: str = "auto"  # auto | never | path of a checkpoint directory
    resume_force: bool = False  # resume even if data, tokenizer or global batch changed (no longer exact)
    # convert a checkpoint of another run (outside output_dir/checkpoints, or another run identity) to the
    # universal format when resuming it at another world size under ZeRO 1-3
    resume_allow_foreign: bool = False
    loss_chunk_tokens: int = 0  # tokens per chunk for the LM head + cross-entropy (0 = unchunked)
    max_skipped_steps: int = 10  # consecutive non-finite steps skipped before the run aborts
    requeue_on_signal: bool = False  # under Slurm: after a SIGUSR1/SIGTERM checkpoint, `scontrol requeue` the job


@dataclass
class DeepSpeedSection(Section):
    config: str = "ds_configs/zero2.json"  # ZeRO / offload / communication settings (JSON)


@dataclass
class WandbConfig(Section):
    mode: Literal["disabled", "offline", "online"] = "disabled"  # offline: a local run dir under output_dir/wandb
    project: str = "llmtrain"  # wandb project
    name: Optional[str] = None  # run name; default: basename of output_dir
    entity: Optional[str] = None  # wandb team/user; default: your wandb default


@dataclass
class LoggingConfig(Section):
    wandb: WandbConfig = field(default_factory=WandbConfig)
    progress: bool = True  # progress bar on rank 0 (step, loss, tokens/s, ETA)


@dataclass
class DistConfig(Section):
    timeout_minutes: float = 30.0  # collective-operation timeout: a missing rank fails instead of hanging
    # total cap on a wait, outside any collective, for one rank's file work (universal-checkpoint conversion,
    # final/ export and LoRA merge) while that rank is alive; 0 = no cap. 24 h: ~5x a 70B conversion at the
    # README's measured ~50 MiB/s (840 GB in ~4.5 h); a dead worker is caught by stale_minutes instead
    wait_minutes: float = 1440.0
    # a waiting rank fails (one line naming the silent rank and host) once a working rank's heartbeat file
    # has not moved for this long (it beats every min(30 s, stale_minutes/5)); keep it well above NFS's ~1 min cache
    stale_minutes: float = 10.0
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass
class ParallelConfig(Section):
    """Parallelism beyond data parallelism, both from DeepSpeed itself (issue 16). The ranks form a
    mesh: data-parallel size DP = world / (sequence_parallel_size x tensor_parallel_size); the
    SP or TP peers of a DP rank are consecutive ranks and read the same rows."""

    # ranks one packed row is split over along the sequence (DeepSpeed Ulysses / ALST: all-to-all
    # over attention heads); activation memory per rank falls ~1/N; N must divide the attention heads
    sequence_parallel_size: int = 1
    # ranks the attention and MLP weights are sharded over (DeepSpeed AutoTP; Llama, Qwen2, Mistral);
    # ZeRO 0-2 only; cannot be combined with sequence_parallel_size > 1
    tensor_parallel_size: int = 1
    # 0 = off; N > 0: every decoder MLP (gate/up/down) computes its rows in N tiles (DeepSpeed's
    # TiledMLP): its intermediate activations exist for one tile at a time; costs one extra MLP
    # forward per step (the backward recomputes each tile). Llama, Qwen2, Mistral; not with TP
    tiled_mlp_shards: int = 0


@dataclass
class DPOConfig(Section):
    beta: float = 0.1  # strength of the KL anchor to the reference model
    loss: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"  # DPO (Rafailov 2023), IPO (Azar 2023), hinge (SLiC)
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped preference labels
    precompute_ref: bool = False  # compute reference log-probs once before training (no ref model in memory)
    # RPO (Pang 2024; TRL rpo_alpha): add nll_weight x the chosen response's per-token NLL to the loss
    nll_weight: float = 0.0
    # dropout off in the policy (the reference always runs in eval mode): DPO compares log-probs of
    # policy and reference on the same sequences, and dropout noise in one of them biases the margin
    # (and breaks loss = ln 2 at step 0). LoRA adapter dropout (lora.dropout) is kept.
    disable_dropout: bool = True


@dataclass
class RLConfig(Section):
    """Online RL (`llmtrain rl`): rollouts from the policy, rewards, advantages, clipped policy loss."""

    # grpo: (r - group mean) / group std; rloo: leave-one-out baseline; gae: PPO with a learned critic (GAE)
    advantage: Literal["grpo", "rloo", "gae"] = "grpo"
    scale_std: bool = True  # grpo: divide by the group std (false = Dr. GRPO: r - group mean)
    std_eps: float = 1.0e-4  # added to the group std (TRL 1e-4)
    num_generations: int = 8  # samples per prompt (G); all of a prompt's samples are on one rank
    prompts_per_step: int = 16  # prompts per rollout, all ranks (a multiple of world size x mini_batches)
    # dynamic sampling (DAPO): candidate prompts per slot, each sampled G times; a slot trains on the first whose
    # samples' rewards differ (else the first). O x the generation cost; 1 = off
    oversample: int = 1
    temperature: float = 1.0  # sampling temperature of rollouts (eval is greedy)
    top_p: float = 1.0  # nucleus sampling of rollouts (1 = off)
    max_new_tokens: int = 64  # completion budget in tokens (a completion without a stop token is truncated)
    ppo_epochs: int = 1  # passes over each rollout; a rollout lasts ppo_epochs x mini_batches optimizer steps
    mini_batches: int = 1  # optimizer steps per pass; each takes 1/mini_batches of the rollout's prompts
    clip_low: float = 0.2  # ratio clip lower bound 1 - clip_low
    clip_high: float = 0.28  # ratio clip upper bound 1 + clip_high (DAPO clip-higher)
    kl_coef: float = 0.0  # KL to the reference model (0 = no reference model)
    kl_type: Literal["k3", "k1"] = "k3"  # k3: loss term per token (GRPO); k1: penalty subtracted from the reward
    reward_fns: list = field(default_factory=list)  # `module:function` names, called (prompts, completions, **columns)
    reward_weights: list = field(default_factory=list)  # one weight per reward function (default: all 1)
    reward_model: Optional[str] = None  # a reward-model directory (launch/reward.py final/), added with weight 1
    generation_backend: Literal["hf", "vllm"] = "hf"  # hf: transformers generate on the engine; vllm: (GPU) vLLM engine
    vllm_gpu_memory_utilization: float = 0.3  # vllm: share of the GPU's memory vLLM takes (weights + KV cache)
    vllm_max_model_len: int = 0  # vllm: context in tokens (0 = longest train/eval prompt + rl.max_new_tokens)
    vllm_sleep: bool = True  # vllm: sleep mode, weights + KV cache freed while training (re-pushed each rollout)
    zero3_gather: bool = True  # ZeRO-3: gather all parameters once per rollout (else per-layer hooks + synced_gpus)
    generation_batch_size: int = 64  # sequences per generate call on each rank
    # gae (PPO): the critic, a sequence-classification directory (e.g. launch/reward.py final/) whose `score`
    # head gives a value at every position; default: rl.reward_model
    critic: Optional[str] = None
    gamma: float = 1.0  # gae: discount per completion token
    lam: float = 0.95  # gae: GAE lambda (1 = Monte-Carlo returns, 0 = one-step TD)
    value_clip: float = 0.2  # gae: clipped value loss range around the rollout's values
    vf_coef: float = 1.0  # gae: value-loss weight (the critic has its own optimizer: scales its gradient only)
    critic_lr: Optional[float] = None  # gae: the critic's peak learning rate (default: train.lr; same schedule)
    whiten_advantages: bool = True  # gae: advantages to mean 0, std 1 over the rollout's tokens (all ranks)


@dataclass
class RewardConfig(Section):
    # Bradley-Terry reward model (llmtrain reward): loss -log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2
    center_coef: float = 0.0  # reward centering (Eisenstein 2023: 0.01): keeps rewards near 0 (0 = off)
    # per-pair margin m (Llama 2): the column of each preference row holding it (e.g. margin); absent: m = 0
    margin_column: Optional[str] = None
    zero_head: bool = True  # start the score head at 0: every reward 0, first loss ln 2 (false: HF's normal init)


@dataclass
class LoraConfig(Section):
    enabled: bool = False  # train LoRA adapters on a frozen base (any task); only adapter params get optimizer state
    r: int = 16  # adapter rank: trainable params per adapted matrix = r x (in + out features)
    alpha: float = 32.0  # LoRA scaling numerator: the update is (alpha / r) x B @ A
    dropout: float = 0.05  # dropout on the adapter's input (0 = none)
    # module names to adapt (suffixes such as [q_proj, v_proj]) or "all-linear": every linear layer but the LM head
    target_modules: Union[str, list] = "all-linear"
    # modules trained fully and saved beside the adapter, e.g. [embed_tokens, lm_head] after adding tokens
    modules_to_save: list = field(default_factory=list)
    use_dora: bool = False  # DoRA (Liu 2024): magnitude/direction split; slower per step, often closer to full FT
    merge: bool = False  # also write final/merged/: the base with the adapter merged in (full safetensors model)
    qlora: bool = False  # (CUDA GPU + bitsandbytes) base in 4-bit NF4 with double quantisation, bf16 compute


@dataclass
class Config(Section):
    output_dir: str = "runs/default"  # where everything of a run goes
    overwrite_output_dir: bool = False  # allow reusing an output_dir holding another run (train.resume=never)
    # inputs made by another command, {path: that command}: while the recipe still uses a path (as
    # model.name_or_path, model.tokenizer or a data source) that does not exist, loading fails with one
    # line naming the command (e.g. the SFT run whose final/ a DPO recipe starts from)
    produced_by: dict = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # one-line notices about values adjusted while loading (printed once by rank 0 at startup)
    notices: list = field(default_factory=list, repr=False, compare=False)
