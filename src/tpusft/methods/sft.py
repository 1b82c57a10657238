"""Supervised fine-tuning and continued pretraining (train_sft.py): packed token rows, the
masked next-token loss."""

from __future__ import annotations

from tpusft.methods import Method, dropout

PANELS = (("loss", "loss (nats/token)", [("train", "loss", "train loss"),
                                         ("eval", "loss", "eval loss")]),)


def method() -> Method:
    from tpusft.aot import compile_step
    from tpusft.data import inspect
    from tpusft.models.decoder import ModelArgs
    from tpusft.training import loss
    from tpusft.training.trainer import sft_trainer

    def batch_line(cfg, rows, per_device, micro):
        return (f"batch {cfg.global_batch_size} x {cfg.max_target_length} tokens "
                f"({per_device} per device{micro})")

    return Method(
        "SFT", lambda cfg: "SFT", ("chat", "text"), PANELS, inspect.sft_rows, ModelArgs.from_config,
        lambda model, optimizer, cfg: sft_trainer(model, optimizer, cfg, compile_step.quiet),
        lambda cfg, rows: loss.sft_batch_shapes(rows, cfg.max_target_length, dropout(cfg)),
        batch_line)
