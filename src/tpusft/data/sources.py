"""Which data a run reads: the config's hf_* keys, or named data sets from a registry file
(a weighted mixture when several are named), and the pipeline options."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from tpusft.data import formats
from tpusft.data.pipeline import FILE_BUILDERS, DataOptions, Source
from tpusft.errors import ConfigError, DataError

ENTRY_KEYS = ("hf_path", "hf_name", "data_files", "split", "eval_split", "eval_files",
              "data_format", "column_map", "max_samples")


def _mixture(value: str | list) -> list[tuple[str, float]]:
    """'a:0.7,b:0.3' or ['a', {name: b, weight: 0.3}] -> [(name, weight)]."""
    items = [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value
    out = []
    for item in items:
        if isinstance(item, dict):
            name, weight = item.get("name"), item.get("weight", 1.0)
        elif isinstance(item, str):
            name, _, w = item.partition(":")
            try:
                weight = float(w) if w else 1.0
            except ValueError:
                raise ConfigError(f"dataset: weight {w!r} of {name!r} is not a number") from None
        else:
            raise ConfigError(f"dataset: {item!r} is neither a name nor {{name, weight}}")
        if not isinstance(name, str) or not name or not isinstance(weight, (int, float)) \
                or weight <= 0:
            raise ConfigError(f"dataset: {item!r} needs a name and a positive weight")
        out.append((name.strip(), float(weight)))
    if not out:
        raise ConfigError("dataset= names no data set")
    return out


def load_registry(path: str) -> tuple[dict[str, dict], Path]:
    file = Path(os.path.expanduser(path))
    if not file.is_absolute() and not file.exists():
        from tpusft.config.loader import configs_root

        packaged = configs_root().parent / path
        file = packaged if packaged.exists() else file
    if not file.is_file():
        raise ConfigError(f"dataset_registry={path!r} does not exist; point it at a YAML file "
                          f"of named data sets")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{file}: expected a mapping of name -> {{hf_path, data_files, ...}}")
    for name, entry in data.items():
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            close = difflib.get_close_matches(unknown[0], ENTRY_KEYS, n=2)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise ConfigError(f"{file}: data set {name!r} has unknown key {unknown[0]!r}{hint}; "
                              f"keys are {', '.join(ENTRY_KEYS)}")
        if "hf_path" not in entry:
            raise ConfigError(f"{file}: data set {name!r} has no hf_path")
    return data, file.parent


def _relative(files: Any, root: Path) -> Any:
    def fix(f: str) -> str:
        return f if "://" in f or os.path.isabs(os.path.expanduser(f)) else str(root / f)

    if files is None:
        return None
    return fix(files) if isinstance(files, str) else [fix(f) for f in files]


def sources(cfg: Any, *, train: bool) -> tuple[list[Source], str]:
    """(sources, part) of the training data (train=True) or the eval data; part tells the
    pipeline whether to take eval_fraction's share. An empty list: no eval data."""
    column_map = formats.parse_column_map(cfg.column_map)
    part = "all"
    if not train and not cfg.eval_fraction and not (cfg.eval_split or cfg.hf_eval_files) \
            and not cfg.dataset:
        return [], part
    if cfg.eval_fraction:
        part = "train" if train else "eval"
    if cfg.dataset:
        registry, root = load_registry(cfg.dataset_registry)
        out = []
        for name, weight in _mixture(cfg.dataset):
            if name not in registry:
                close = difflib.get_close_matches(name, list(registry), n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"dataset {name!r} is not in {cfg.dataset_registry}{hint}")
            e = registry[name]
            split, files = e.get("split", cfg.train_split), e.get("data_files")
            if not train and not cfg.eval_fraction:
                if not (e.get("eval_split") or e.get("eval_files")):
                    continue  # this member has no eval data
                split, files = e.get("eval_split") or split, e.get("eval_files") or files
            out.append(Source(
                name=name, hf_path=e["hf_path"], split=split, data_files=_relative(files, root),
                hf_name=e.get("hf_name"), data_format=e.get("data_format", cfg.data_format),
                column_map=formats.parse_column_map(e.get("column_map")) or column_map,
                max_samples=e.get("max_samples", cfg.max_samples), weight=weight,
                files_key=f"{name}.data_files"))
        return out, part
    if train or cfg.eval_fraction:
        split, files, key = cfg.train_split, cfg.hf_data_files, "hf_data_files"
    else:
        if cfg.hf_path in FILE_BUILDERS and not cfg.hf_eval_files:
            raise DataError(f"eval_split={cfg.eval_split!r} cannot select rows of hf_path="
                            f"{cfg.hf_path!r} files; give the eval file(s) with hf_eval_files= "
                            f"or hold out eval_fraction=")
        split = cfg.eval_split or cfg.train_split
        files, key = ((cfg.hf_eval_files, "hf_eval_files") if cfg.hf_eval_files
                      else (cfg.hf_data_files, "hf_data_files"))
    return [Source(name=cfg.hf_path, hf_path=cfg.hf_path, split=split, data_files=files,
                   hf_name=cfg.hf_name, data_format=cfg.data_format, column_map=column_map,
                   max_samples=cfg.max_samples, files_key=key)], part


def options(cfg: Any, *, train: bool) -> DataOptions:
    return DataOptions(
        max_length=cfg.max_target_length, packing=cfg.packing,
        packing_strategy=cfg.packing_strategy, truncation=cfg.truncation,
        bad_row_policy=cfg.bad_row_policy, completion_only=cfg.sft_train_on_completion_only,
        seed=cfg.shuffle_seed, num_epochs=cfg.num_epochs if train else 1,
        eval_fraction=cfg.eval_fraction,
        # data_sharding=global: every process reads every row (and keeps its part of a batch)
        **({"shard_index": 0, "shard_count": 1} if cfg.data_sharding == "global" else {}))
