"""The run's TensorBoard scalars: tpusft's own, under one naming scheme for every method
(`train/...` and `eval/...`); library-internal scalars only when asked for.

Tunix's metrics logger hands every `jax.monitoring` scalar to its TensorBoard backend: JAX's
compile timings and Orbax's write speeds among them, GRPO's metrics under `actor/`,
`rewards/` and `completions/` prefixes (the last two a step off from the step they describe,
and repeating what tpusft logs as `train/reward...` and `train/completion_length`), and the
learning rate again in eval mode. `ProjectScalars` keeps tpusft's names and drops the rest
unless `tensorboard_library_scalars=true`, which keeps them under their own names.
"""

from __future__ import annotations

from typing import Any

from metrax.logging import TensorboardBackend

# What Tunix's GRPO trainer logs under actor/train/ that is tpusft's to show (its kl and
# pg_clipfrac are logged by tpusft as train/kl and train/clip_fraction).
_ACTOR_KEPT = ("loss", "learning_rate", "grad_norm")


def project_tag(event: str) -> str | None:
    """The TensorBoard tag of a scalar event, or None for a library-internal one."""
    name = event.lstrip("/")
    if name.startswith("tpusft/"):
        return name[len("tpusft/"):]
    if name.startswith("actor/train/"):
        metric = name[len("actor/train/"):]
        return f"train/{metric}" if metric in _ACTOR_KEPT else None
    if name.startswith(("train/", "eval/")) and name != "eval/learning_rate":
        return name
    return None


class ProjectScalars(TensorboardBackend):
    def __init__(self, log_dir: str, flush_every_n_steps: int = 100,
                 library_scalars: bool = False):
        super().__init__(log_dir=log_dir, flush_every_n_steps=flush_every_n_steps)
        self._library = library_scalars

    def log_scalar(self, event: str, value: Any, **kwargs) -> None:
        tag = project_tag(event)
        if tag is None and self._library:
            tag = event
        if tag is not None:
            super().log_scalar(tag, value, **kwargs)


def logger_options(cfg: Any):
    """Tunix's metrics-logger options writing through ProjectScalars."""
    from tunix.sft import metrics_logger as tunix_metrics

    def backend():
        return ProjectScalars(cfg.tensorboard_directory, cfg.log_period,
                              cfg.tensorboard_library_scalars)

    return tunix_metrics.MetricsLoggerOptions(
        log_dir=cfg.tensorboard_directory, flush_every_n_steps=cfg.log_period,
        backend_kwargs={"custom_backend": [backend]})


def write_scalars(cfg: Any, step: int, values: dict[str, float]) -> None:
    """Scalars logged after the trainer's logger is closed (a run's final evaluation), in an
    event file of their own beside the run's."""
    from tpusft import distributed

    if not distributed.is_primary():
        return
    backend = ProjectScalars(cfg.tensorboard_directory, 1, cfg.tensorboard_library_scalars)
    try:
        for tag, value in values.items():
            backend.log_scalar(tag, value, step=step)
    finally:
        backend.close()
