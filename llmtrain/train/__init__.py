"""The training path: runner.py wires a run (config -> dist -> tokenizer -> data -> model -> engine ->
resume -> loop -> export), loop.py is the one loop, engine.py the DeepSpeed adapter (ds_config.py,
optim.py), checkpoint.py / ckpt_engine.py / universal.py save and resume, export.py writes final/,
metrics.py, signals.py and flops.py what the loop reports and obeys."""
