"""Preference training (train_dpo.py): DPO, ORPO, SimPO on chosen/rejected pairs; with DPO a
frozen reference's log-probs."""

from __future__ import annotations

from tpusft.methods import Method, dropout

PANELS = (("loss", "preference loss", [("train", "loss", "train loss"),
                                       ("eval", "loss", "eval loss")]),)


def method() -> Method:
    """The policy's step, and for DPO the reference's log-prob program."""
    from tpusft.aot import compile_step
    from tpusft.data import inspect
    from tpusft.models.decoder import ModelArgs
    from tpusft.training import preference, report
    from tpusft.training.preference_loss import PreferenceLoss, pair_batch_shapes
    from tpusft.training.setup import reference_model

    def args(cfg):
        return preference.policy_args(ModelArgs.from_config(cfg),
                                      PreferenceLoss.from_config(cfg), print_fn=lambda *_: None)

    def make_trainer(model, optimizer, cfg):
        needs_reference = PreferenceLoss.from_config(cfg).needs_reference
        ref = reference_model(model) if needs_reference else None
        return preference.preference_trainer(model, ref, optimizer, cfg, compile_step.quiet)

    def shapes(cfg, rows):
        return pair_batch_shapes(rows, cfg.max_target_length, dropout(cfg),
                                 PreferenceLoss.from_config(cfg).needs_reference)

    def batch_line(cfg, rows, per_device, micro):
        return (f"batch {cfg.global_batch_size} x {cfg.max_target_length} tokens "
                f"({per_device} per device{micro})")

    return Method(
        "preference", lambda cfg: f"preference training ({cfg.dpo.loss_type})", ("preference",),
        PANELS, inspect.preference_rows, args, make_trainer, shapes, batch_line,
        flops_factor=lambda cfg: 4 / 3 if PreferenceLoss.from_config(cfg).needs_reference
        else 1, dense=report.PAIRS)
