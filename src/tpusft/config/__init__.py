"""Typed configuration: schema, YAML chain and overrides."""

from tpusft.config.loader import load_config, resolved_yaml
from tpusft.config.schema import Config

__all__ = ["Config", "load_config", "resolved_yaml"]
