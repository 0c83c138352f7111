"""One module per task, each an `Objective` (base.py): causal_lm.py (pretraining and SFT), dpo.py
(with its reference model, reference.py), reward.py (reward models), rl/ (online RL); the shared LM forward
is lm_forward.py.

OBJECTIVES maps each training command to its objective: the CLI, launch/<task>.py and
`llmtrain prepare --task` look objectives up here, and nothing else knows a task by name.
"""
from .base import Objective, RunContext
from .causal_lm import SFT, CausalLM, Pretrain
from .dpo import DPO
from .reward import Reward
from .rl import RL

OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (SFT, DPO, Reward, Pretrain, RL)}

__all__ = ["DPO", "OBJECTIVES", "RL", "SFT", "CausalLM", "Objective", "Pretrain", "Reward", "RunContext"]
