"""Typed run configuration: the sections (schema.py), recipe loading and overrides (loading.py),
value checks (validation.py). `from llmtrain.config import Config, load_config, TrainConfig, ...`."""
from ..errors import ConfigError
from .loading import (SOURCE_FIELDS, load_config, parse_override, redact, save_resolved, sources, to_dict)
from .validation import check_produced_inputs
from .schema import (Config, DataConfig, DeepSpeedSection, DistConfig, DPOConfig, LoggingConfig, LoraConfig,
                     ModelConfig, ParallelConfig, RewardConfig, RLConfig, SourceConfig, TrainConfig, WandbConfig)

__all__ = ["SOURCE_FIELDS", "Config", "ConfigError", "DPOConfig", "DataConfig", "DeepSpeedSection", "DistConfig",
           "LoggingConfig", "LoraConfig", "ModelConfig", "ParallelConfig", "RLConfig", "RewardConfig", "SourceConfig",
           "TrainConfig", "WandbConfig", "check_produced_inputs", "load_config", "parse_override", "redact",
           "save_resolved", "sources", "to_dict"]
