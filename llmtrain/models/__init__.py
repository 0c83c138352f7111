"""Tokenizer and model loading (hub id, local directory, or built from model.config), the attention
kernel choice and its CPU reference, explicit GPU fast paths, LoRA/QLoRA."""
