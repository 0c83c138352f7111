"""Offline tools beside training (nothing on the training path imports them, but for the end-of-run
curves): the memory planner, run curves, the mask preview, generation for chat and the demo's
eval, tokenizer training. Their command lines live in llmtrain/cli/."""
