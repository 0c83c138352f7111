"""Loss functions: pure functions ``(inputs) -> (loss, metrics)``, each with its paper's formula.

Torch only (no transformers / deepspeed import), so every loss can be tested on CPU
against hand computations. token_logps.py: label log-probs (chunked LM head); causal_lm.py:
pretraining/SFT; sequence.py: per-sequence sums; preference.py: the DPO family and its registry;
reward.py: the reward model's Bradley-Terry loss and its last-token read-out.

Conventions
-----------
* ``labels`` use ``IGNORE_INDEX`` (-100, data/labels.py) for positions that are not trained
  (padding, masked prompts, sample boundaries in packed rows).
* Token-level functions take hidden states / logits *already aligned* with the labels:
  position ``t`` predicts ``labels[:, t]``. ``shift_labels`` does that alignment for
  causal LMs (hidden at ``t`` predicts token ``t + 1``).
* Log-probs are always computed in fp32, whatever the model dtype.
* Normalisation over the global batch (all micro-batches, all ranks) is the caller's
  job: ``causal_lm_loss`` takes the global target-token count, the DPO losses take
  ``reduction="sum"`` so the caller can divide by the global pair count.
* ``metrics`` values are detached tensors; nothing here calls ``.item()`` (which would
  sync the device), so logging decides when to pay for that.
"""
from ..data.labels import IGNORE_INDEX
from .causal_lm import causal_lm_loss
from .preference import (PREFERENCE_LOSSES, PreferenceLoss, chosen_nll_loss, dpo_hinge_loss, dpo_ipo_loss,
                         dpo_sigmoid_loss)
from .reward import bradley_terry_loss, last_token_values, reward_metrics
from .sequence import packed_sequence_logps, sequence_logps
from .token_logps import Metrics, shift_labels, token_logps_and_sum_ce, token_logps_from_logits

__all__ = ["IGNORE_INDEX", "PREFERENCE_LOSSES", "Metrics", "PreferenceLoss", "bradley_terry_loss", "causal_lm_loss",
           "chosen_nll_loss", "last_token_values", "reward_metrics",
           "dpo_hinge_loss", "dpo_ipo_loss", "dpo_sigmoid_loss", "packed_sequence_logps", "sequence_logps",
           "shift_labels", "token_logps_and_sum_ce", "token_logps_from_logits"]
