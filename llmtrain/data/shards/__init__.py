"""Pretraining data: corpora tokenized once into token shards (prepare.py), read as fixed-length
rows (store.py: format and row sampler; rows.py: the loop's data over them)."""
