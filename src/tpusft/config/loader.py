"""Config loading: a YAML chain through `base_config`, a model preset, `key=value` overrides.

Precedence, lowest first: the chain's root file (configs/base.yml, which holds every key),
the model preset chosen by `model_name`, the other files of the chain (root side first),
the command line.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from tpusft.config.schema import MODEL_KEYS, MOVED_KEYS, Config, flat_fields, sections
from tpusft.errors import ConfigError


def configs_root() -> Path:
    """The directory holding base.yml and models/ (TPUSFT_CONFIGS overrides)."""
    env = os.environ.get("TPUSFT_CONFIGS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "configs"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the
    last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); "
                    f"keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; give a YAML file such as "
                          f"{configs_root()}/sft.yml")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (check the path; configs live in "
                          f"{configs_root()})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as "
                          f"UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of key: value, not {type(data).__name__}")
    return data


def _yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """Returns [(file, values)] from the root of the base_config chain down to `path`."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"base_config cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    data = _read_yaml(path)
    base = data.pop("base_config", None)
    if base is None:
        return [(path, data)]
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    return _yaml_chain(base_path, seen + (path,)) + [(path, data)]


_FLAT = flat_fields()
_FIELD_TYPES = {name: tp for name, (_, tp) in _FLAT.items()}
_FIELDS = {name: f for name, (f, _) in _FLAT.items()}


def _flatten(layer: dict[str, Any], source: str) -> dict[str, Any]:
    """YAML `lora: {rank: 8}` -> {'lora.rank': 8}."""
    out = {}
    for name, value in layer.items():
        if name in sections():
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name} must be a mapping of {name}.* keys, e.g. "
                                  f"{name}: {{...}}")
            out.update({f"{name}.{k}": v for k, v in value.items()})
        else:
            out[name] = value
    return out


def _allowed(name: str) -> tuple[type, ...]:
    tp = _FIELD_TYPES[name]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return tuple(typing.get_origin(a) or a for a in typing.get_args(tp))
    return (typing.get_origin(tp) or tp,)


def _type_names(allowed: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             list: "a list", dict: "a mapping", type(None): "null"}
    return " or ".join(names.get(t, t.__name__) for t in allowed)


def coerce(name: str, value: Any, source: str) -> Any:
    """Checks `value` against the schema type of `name`; returns it converted (int -> float)."""
    allowed = _allowed(name)
    if value is None:
        if type(None) in allowed:
            return None
    elif isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, str) and str in allowed:
        return value
    elif isinstance(value, str) and float in allowed:
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    elif isinstance(value, list) and list in allowed:
        return value
    elif isinstance(value, dict) and dict in allowed:
        return value
    raise ConfigError(f"{source}: {name}={value!r} has the wrong type; expected "
                      f"{_type_names(allowed)}")


def parse_override(arg: str) -> tuple[str, Any]:
    """Parses one `key=value` argument; the value is typed by the schema."""
    if "=" not in arg:
        raise ConfigError(f"argument {arg!r} is not key=value (e.g. steps=100)")
    name, raw = arg.split("=", 1)
    name = name.strip()
    _check_known(name, "command line")
    allowed = _allowed(name)
    if raw in ("null", "None", "~") and type(None) in allowed:
        return name, None
    if str in allowed and list not in allowed:
        return name, raw  # strings stay verbatim: run_name=007, prompt=yes
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        raise ConfigError(f"command line: cannot parse {name}={raw!r}; lists look like "
                          f"{name}=['a','b']") from None
    return name, coerce(name, value, "command line")


def _check_known(name: str, source: str) -> None:
    if name in _FIELDS:
        return
    if name in MOVED_KEYS:
        raise ConfigError(f"{source}: config key {name!r} is now {MOVED_KEYS[name]!r}; write "
                          f"{MOVED_KEYS[name]}=... (YAML: under {MOVED_KEYS[name].split('.')[0]}:)")
    close = difflib.get_close_matches(name, list(_FIELDS), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see configs/base.yml for all keys"
    raise ConfigError(f"{source}: unknown config key {name!r}{hint}")


def _apply(values: dict[str, Any], layer: dict[str, Any], source: str) -> None:
    for name, value in _flatten(layer, source).items():
        _check_known(name, source)
        values[name] = coerce(name, value, source)


def _preset_path(model_name: str) -> Path:
    p = Path(model_name)
    if p.suffix in (".yml", ".yaml"):
        return p
    return configs_root() / "models" / f"{model_name}.yml"


def load_preset(model_name: str) -> dict[str, Any]:
    path = _preset_path(model_name)
    if not path.is_file():
        known = sorted(q.stem for q in (configs_root() / "models").glob("*.yml"))
        close = difflib.get_close_matches(model_name, known, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(known)}"
        raise ConfigError(f"unknown model_name {model_name!r}: no preset {path}; {hint}")
    data = _read_yaml(path)
    for name in data:
        if name not in MODEL_KEYS:
            raise ConfigError(f"model preset {path}: {name!r} is not a model key "
                              f"(allowed: {', '.join(MODEL_KEYS)})")
    return data


def validate(cfg: Config, needs_data: bool = True) -> None:
    """Checks choices, minimums and relations between keys; raises ConfigError. Without
    `needs_data` (sampling), no data set or tokenizer is required."""
    for name, f in _FIELDS.items():
        section, _, key = name.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, key)
        choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}={value!r} is not allowed; choose one of "
                              f"{', '.join(repr(c) for c in choices)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}={value} is not a finite number")
        if minimum is not None and value is not None and value < minimum:
            raise ConfigError(f"{name}={value!r} is too small; expected a value >= {minimum:g}")
    for name in ("adam_b1", "adam_b2"):
        if not getattr(cfg, name) < 1:
            raise ConfigError(f"{name}={getattr(cfg, name)} must be in [0, 1) (e.g. 0.9, 0.95)")
    check_run_name(cfg.run_name)
    if cfg.global_batch_size % cfg.gradient_accumulation_steps:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} is not divisible by "
            f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}")
    if cfg.base_num_query_heads % cfg.base_num_kv_heads:
        raise ConfigError(f"base_num_query_heads={cfg.base_num_query_heads} must be a multiple "
                          f"of base_num_kv_heads={cfg.base_num_kv_heads}")
    if cfg.num_vocab_tiling and cfg.max_target_length % cfg.num_vocab_tiling:
        raise ConfigError(f"num_vocab_tiling={cfg.num_vocab_tiling} must divide "
                          f"max_target_length={cfg.max_target_length} (or be 0: automatic)")
    if cfg.head_dim % 2:
        raise ConfigError(f"head_dim={cfg.head_dim} must be even for RoPE")
    if cfg.model_family == "gemma2" and cfg.base_num_decoder_layers % 2:
        raise ConfigError(f"gemma2 pairs a local and a global layer; base_num_decoder_layers="
                          f"{cfg.base_num_decoder_layers} must be even")
    from tpusft.models.families import FAMILIES

    for name in ("attention_bias", "mlp_bias"):
        if getattr(cfg, name) and name not in FAMILIES[cfg.model_family].hf_bias_fields:
            have = [f.name for f in FAMILIES.values() if name in f.hf_bias_fields]
            raise ConfigError(f"{name}=true is not part of {cfg.model_family} models (families "
                              f"with it: {', '.join(have)})")
    if cfg.attention == "cudnn" and cfg.attn_logits_soft_cap:
        raise ConfigError("attention=cudnn has no score soft-capping; use attention=auto or xla "
                          "with attn_logits_soft_cap")
    parallel = [cfg.ici_data_parallelism, cfg.ici_fsdp_parallelism, cfg.ici_tensor_parallelism]
    if parallel.count(-1) > 1:
        raise ConfigError("at most one of ici_data_parallelism, ici_fsdp_parallelism, "
                          "ici_tensor_parallelism may be -1")
    if any(p == 0 or p < -1 for p in parallel):
        raise ConfigError(f"ici_*_parallelism must be positive or -1, got {parallel}")
    if cfg.warmup_steps_fraction > 1:
        raise ConfigError(f"warmup_steps_fraction={cfg.warmup_steps_fraction} must be in [0, 1]")
    if cfg.lora.weight_qtype and not cfg.lora.enable_lora:
        raise ConfigError(f"lora.weight_qtype={cfg.lora.weight_qtype} quantizes the frozen base "
                          f"of a LoRA run; set lora.enable_lora=true too")
    if not cfg.lora.dropout < 1:
        raise ConfigError(f"lora.dropout={cfg.lora.dropout} must be below 1")
    if not cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing={cfg.dpo.label_smoothing} must be below 0.5 "
                          f"(at 0.5 a pair says nothing)")
    if not cfg.eval_fraction < 1:
        raise ConfigError(f"eval_fraction={cfg.eval_fraction} must be below 1")
    if not cfg.demo_task and not cfg.print_config and not cfg.compile_topology and needs_data:
        if not cfg.hf_path and not cfg.dataset:
            raise ConfigError("hf_path is empty; set hf_path= to a hub data set, json/parquet "
                              "with hf_data_files=, or a local directory (or dataset= to a "
                              "name in dataset_registry)")
        if not cfg.tokenizer_path:
            raise ConfigError("tokenizer_path is empty; set it to a Hugging Face tokenizer "
                              "directory")


def check_run_name(run_name: str | None) -> None:
    """A run's outputs stay inside base_output_directory: run_name is one plain folder name."""
    if run_name is None:
        return
    if (not run_name.strip() or run_name in (".", "..") or any(c in run_name for c in "/\\")
            or run_name.startswith("~") or "\0" in run_name):
        raise ConfigError(f"run_name={run_name!r} must be a plain folder name (no '/', '\\', "
                          f"'..' or '~'); outputs go to base_output_directory/run_name")


def _join(base: str, *parts: str) -> str:
    if "://" in base:
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def absolute_path(path: str) -> str:
    """A local path made absolute (Orbax and TensorStore refuse relative ones); URLs such as
    gs:// and the empty string as given."""
    return path if not path or "://" in path else str(Path(path).expanduser().absolute())


def derived_paths(values: dict[str, Any]) -> dict[str, Any]:
    """run_name (a timestamp when unset), base_output_directory made absolute and the run's
    directories under them."""
    check_run_name(values.get("run_name"))
    run_name = values.get("run_name") or datetime.datetime.now().strftime("%Y-%m-%d-%H-%M-%S")
    base = absolute_path(values.get("base_output_directory") or ".")
    run = _join(base, run_name)
    return {"run_name": run_name, "base_output_directory": base, "run_directory": run,
            "checkpoint_directory": _join(run, "checkpoints"),
            "tensorboard_directory": _join(run, "tensorboard"),
            "profile_directory": _join(run, "profile")}


# A layer: (the values so far, the keys set above base.yml) -> values to set before the
# Config is built and validated.
Layer = Callable[[dict[str, Any], set[str]], dict[str, Any]]


def _demo_layer(values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    if not values.get("demo_task"):
        return {}
    from tpusft.demo import arithmetic

    return arithmetic.config_layer(values)


def load_config(argv: Sequence[str], needs_data: bool = True,
                layers: Sequence[Layer] = ()) -> Config:
    """`argv` is [CONFIG.yml, key=value, ...] as given on the command line. The values are
    layered: base.yml, the model preset, the task configs and the command line, then the
    derived paths, the demo's assets (demo_task) and `layers` (keys a checkpoint records);
    the Config is then built, validated and frozen."""
    if not argv or "=" in argv[0]:
        raise ConfigError("usage: CONFIG.yml [key=value ...]; the first argument is a YAML file "
                          "such as configs/sft.yml")
    chain = _yaml_chain(Path(argv[0]))
    parsed = [parse_override(a) for a in argv[1:]]
    overrides = dict(parsed)
    for name in overrides:
        given = [a for a in argv[1:] if a.split("=", 1)[0].strip() == name]
        if len(given) > 1:
            print(f"note: {name} is given {len(given)} times on the command line "
                  f"({', '.join(given)}); the last one is used", file=sys.stderr)

    values: dict[str, Any] = {}
    root_path, root_values = chain[0]
    _apply(values, root_values, str(root_path))
    upper: dict[str, Any] = {}
    for path, layer in chain[1:]:
        _apply(upper, layer, str(path))
    upper.update(overrides)

    model_name = upper.get("model_name", values.get("model_name", Config.model_name))
    values.update(load_preset(model_name))
    values.update(upper)
    values.update(derived_paths(values))
    for layer in (_demo_layer, *layers):
        values.update(layer(dict(values), set(upper)))

    nested = {name: cls(**{k.partition(".")[2]: v for k, v in values.items()
                           if k.startswith(name + ".")}) for name, cls in sections().items()}
    cfg = Config(**{k: v for k, v in values.items() if "." not in k}, **nested)
    validate(cfg, needs_data)
    return cfg


def resolved_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None, width=100)


def base_yaml_text() -> str:
    """The text of configs/base.yml, generated from the schema."""
    lines = ["# Every tpusft config key with its default. Generated from",
             "# src/tpusft/config/schema.py by `python -m tpusft.config --write-base`; edit the",
             "# schema, not this file. Task configs inherit it with `base_config: base.yml`.", ""]
    current = ""
    for name, f in _FIELDS.items():
        section, _, key = name.rpartition(".")
        indent = "  " if section else ""
        if f.metadata.get("section"):
            lines += ["", f"# ---- {f.metadata['section']}"]
        if section and section != current:
            lines.append(f"{section}:")
        current = section
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        lines.append(f"{indent}# {f.metadata['doc']}")
        dumped = yaml.safe_dump({key: default}, default_flow_style=True, width=1000).strip()
        lines.append(indent + (dumped[1:-1] if dumped.startswith("{") else dumped))
    return "\n".join(lines).lstrip("\n") + "\n"
