"""What every trainer does before compiling: checks of vocabulary, batch layout and existing
checkpoints, and the model built from the config (weights, adapters, quantized base)."""

from __future__ import annotations

from typing import Any

from etils import epath

from tpusft.errors import ConfigError
from tpusft.models.sharding import batch_shards


def check_vocab(cfg: Any, tokenizer) -> None:
    if len(tokenizer) > cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but vocab_size="
                          f"{cfg.vocab_size}; use the model's own tokenizer or a larger "
                          f"vocab_size")


def check_batch(cfg: Any, mesh) -> None:
    from tpusft import distributed

    micro = cfg.global_batch_size // cfg.gradient_accumulation_steps
    ways = batch_shards(mesh)
    if micro % ways:
        raise ConfigError(
            f"global_batch_size={cfg.global_batch_size} / gradient_accumulation_steps="
            f"{cfg.gradient_accumulation_steps} = {micro} sequences per micro-batch cannot be "
            f"split over the {ways} devices of the data and fsdp axes; use a multiple of {ways}")
    processes = distributed.count()
    if micro % processes:
        raise ConfigError(
            f"{micro} sequences per micro-batch cannot be split over the run's {processes} "
            f"processes; use a global_batch_size / gradient_accumulation_steps that is a "
            f"multiple of {processes}")


def local_rows(cfg: Any, rows: int) -> int:
    """The rows of a `rows`-row batch that this process's data pipeline builds: its share
    with data_sharding=process, all of them with global (the feeder keeps this process's)."""
    from tpusft import distributed

    return rows if cfg.data_sharding == "global" else rows // distributed.count()


def check_bucket(url: str, timeout_s: float = 10.0) -> None:
    """One request for a gs:// output's bucket, with credentials found first: a missing
    bucket, no access or no credentials is one line in seconds (the storage clients would
    retry for minutes). $STORAGE_EMULATOR_HOST points it at an emulator."""
    import os

    import requests

    bucket = url.removeprefix("gs://").split("/")[0]
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        session, endpoint = requests.Session(), emulator.rstrip("/")
    else:
        import google.auth
        import google.auth.exceptions
        from google.auth.transport.requests import AuthorizedSession

        try:
            credentials, _ = google.auth.default(
                scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
        except google.auth.exceptions.DefaultCredentialsError:
            raise ConfigError(f"no Google Cloud credentials for {url}: run `gcloud auth "
                              f"application-default login`, or set "
                              f"GOOGLE_APPLICATION_CREDENTIALS to a key file") from None
        session, endpoint = AuthorizedSession(credentials), "https://storage.googleapis.com"
    try:
        response = session.get(f"{endpoint}/storage/v1/b/{bucket}", timeout=timeout_s)
    except Exception as e:  # noqa: BLE001 - DNS, TLS, refused connections, token refresh
        detail = " ".join(str(e).split())[:160]
        raise ConfigError(f"cannot reach Cloud Storage for {url} ({detail})") from None
    if response.status_code == 404:
        raise ConfigError(f"bucket gs://{bucket} does not exist; create it or fix "
                          f"base_output_directory")
    if response.status_code in (401, 403):
        raise ConfigError(f"no access to bucket gs://{bucket} (HTTP {response.status_code}); "
                          f"check the credentials' permissions")


def prepare_run_directory(cfg: Any):
    """Creates run_directory (a test file written and removed), or stops with one line when
    the output cannot be written (a file in the way, a read-only file system, a gs:// bucket
    that does not exist or no credentials): before any data is read or anything compiled."""
    if cfg.run_directory.startswith("gs://"):
        check_bucket(cfg.run_directory)
    out = epath.Path(cfg.run_directory)
    from tpusft import distributed

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".tpusft-write-test-{distributed.index()}"
        probe.write_text("ok")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - OSError locally; gcsfs/google-auth errors on gs://
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(f"cannot write the run's outputs to {cfg.run_directory} ({detail}); "
                          f"set base_output_directory= to a writable directory or bucket") from None
    return out


# The keys that make the optimizer's schedule and updates: a resumed run that changes them
# continues from its step with the new values, and says so.
SCHEDULE_KEYS = ("steps", "learning_rate", "warmup_steps_fraction",
                 "learning_rate_final_fraction", "adam_b1", "adam_b2", "adam_eps",
                 "adam_weight_decay", "adam_weight_decay_norms_and_biases",
                 "gradient_clipping_threshold")


def write_resolved_config(cfg: Any, out, print_fn=print) -> None:
    """run_directory/config.yml: the run's config as resolved (process 0 writes it). A run
    resuming with other optimizer settings than the config.yml it left says which."""
    import yaml

    from tpusft import distributed
    from tpusft.config import resolved_yaml

    if not distributed.is_primary():
        return
    path = out / "config.yml"
    if path.exists() and resuming(cfg):
        try:
            before = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError):
            before = {}
        changed = [f"{k} {before[k]} -> {getattr(cfg, k)}" for k in SCHEDULE_KEYS
                   if k in before and before[k] != getattr(cfg, k)]
        if changed:
            print_fn(f"note: resuming with other optimizer settings than the run's last "
                     f"start ({', '.join(changed)}): the schedule continues from the "
                     f"checkpoint's step with the new values")
    path.write_text(resolved_yaml(cfg))


def metrics_writer(out):
    """run_directory/metrics.jsonl's writer (one that writes nothing on processes other
    than 0)."""
    from tpusft import distributed
    from tpusft.training.metrics import JsonlWriter

    return JsonlWriter(str(out / "metrics.jsonl"), enabled=distributed.is_primary())


def existing_checkpoint(cfg: Any, sub: str = "") -> bool:
    """True when run_name already has a checkpoint step (the run will resume); `sub` is the
    trainer's folder inside checkpoint_directory (GRPO's actor)."""
    if not cfg.enable_checkpointing:
        return False
    root = epath.Path(cfg.checkpoint_directory) / sub if sub else epath.Path(
        cfg.checkpoint_directory)
    return root.exists() and any(p.name.isdigit() for p in root.iterdir())


def resuming(cfg: Any) -> bool:
    """True when run_name already has a checkpoint step, a GRPO run's (actor/) included."""
    return existing_checkpoint(cfg) or existing_checkpoint(cfg, "actor")


def build_model(cfg: Any, args, mesh, resuming: bool, print_fn=print):
    """The sharded model: load_parameters_path's weights (a LoRA run's base every time, since
    its checkpoints hold only adapters), lora.adapter_path's adapters, and the QLoRA base
    quantized. A resumed full fine-tune gets its weights from the trainer's checkpoint."""
    from tpusft.conversion.convert import load_adapters
    from tpusft.conversion.native import restore_params
    from tpusft.models import lora
    from tpusft.models.decoder import abstract_model, create_model

    loads_base = bool(cfg.load_parameters_path) and (not resuming or bool(args.lora_rank))
    loads_adapters = bool(cfg.lora.adapter_path) and not resuming
    if loads_base and (loads_adapters or not args.lora_rank) and mesh is not None:
        # Every weight comes from a checkpoint: shapes and shardings only, no random values
        # to compute (and compile for) only to be overwritten.
        model = abstract_model(args, mesh, cfg.logical_axis_rules)
    else:
        model = create_model(args, mesh, cfg.logical_axis_rules, cfg.seed)
    if loads_base:
        read = restore_params(model, cfg.load_parameters_path)
        print_fn(f"loaded parameters from {read}")
    if loads_adapters:
        read = load_adapters(model, args, cfg.lora.adapter_path)
        print_fn(f"loaded LoRA adapters from {read}")
    if args.lora_qtype:
        before = lora.weight_bytes(model)
        n = lora.quantize_base(model, args.lora_qtype, args.scan_layers)
        print_fn(f"QLoRA: {n} layer kernels stored as {args.lora_qtype} with Qwix "
                 f"({lora.weight_bytes(model) / 2**30:.3f} GiB of weights, was "
                 f"{before / 2**30:.3f} GiB)")
    return model


def reference_model(model):
    """A frozen reference for KL-anchored training (GRPO's KL, DPO's log-ratio): the model as
    training starts. A LoRA model's shares the model's (frozen) base arrays, so there is no
    second copy of the base, and holds a copy of the starting adapters, as TRL's reference
    adapter does: a run that continues trained adapters (lora.adapter_path) is anchored to
    them, and new adapters, whose B is zero, add exactly nothing. A full fine-tune's is a copy
    of the starting weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from tpusft.models import lora

    graphdef, state = nnx.split(model)
    if lora.adapters(model):
        ref = nnx.merge(graphdef, state)  # the same Variables: no second copy of the base
        for _, module in lora.adapters(ref):
            for name in ("lora_a", "lora_b"):
                setattr(module, name, nnx.LoRAParam(jnp.copy(getattr(module, name)[...])))
        return ref
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def train_and_eval_data(cfg: Any, tokenizer, build) -> tuple[Any, Any, Any]:
    """(train batches, their DataStats, eval batches or None) through a data tail's
    `build_dataset` (packing.py, pairs.py), each checked for a first batch before compiling."""
    from tpusft.data import pipeline, sources

    train_sources, part = sources.sources(cfg, train=True)
    train_ds, stats = build(train_sources, sources.options(cfg, train=True), tokenizer,
                            local_rows(cfg, cfg.global_batch_size), train=True, part=part)
    pipeline.first_batch_or_error(train_ds, stats, "training")
    eval_ds = None
    eval_sources, part = sources.sources(cfg, train=False)
    if eval_sources:
        micro_batch = cfg.global_batch_size // cfg.gradient_accumulation_steps
        eval_ds, eval_stats = build(eval_sources, sources.options(cfg, train=False), tokenizer,
                                    local_rows(cfg, micro_batch), train=False, part=part)
        pipeline.first_batch_or_error(eval_ds, eval_stats, "eval")
    return train_ds, stats, eval_ds
