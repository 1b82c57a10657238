"""Sample from a checkpoint with the KV cache.

    python -m tpusft.generate configs/demo/sft.yml load_parameters_path=runs/demo-sft/checkpoints \
        generate.prompt="12+30="
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: Sequence[str]) -> int:
    from tpusft.config import load_config
    from tpusft.errors import ConfigError

    cfg = load_config(argv, needs_data=False, layers=[checkpoint_layer(argv[1:])])
    if not cfg.generate.prompt:
        raise ConfigError('generate.prompt is empty; pass generate.prompt="your message"')
    if not cfg.load_parameters_path:
        raise ConfigError("load_parameters_path is empty; point it at a checkpoint (e.g. "
                          "runs/<run_name>/checkpoints)")

    from tpusft.conversion.native import restore_params
    from tpusft.data.chat import load_tokenizer
    from tpusft.demo import evaluate
    from tpusft.models.decoder import ModelArgs, create_model
    from tpusft.models.sharding import mesh_of

    warnings.filterwarnings("ignore", message=".*mesh.*context manager.*")
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    (ids,) = evaluate.chat_prompt_ids(tokenizer, [cfg.generate.prompt])
    if len(ids) > cfg.generate.max_prefill_length:
        raise ConfigError(f"the prompt is {len(ids)} tokens with the chat template, more than "
                          f"generate.max_prefill_length={cfg.generate.max_prefill_length}; "
                          f"raise it (up to the model's context) or shorten the prompt")
    mesh = mesh_of(cfg)
    with mesh:
        model = create_model(ModelArgs.from_config(cfg), mesh, cfg.logical_axis_rules, cfg.seed)
        restore_params(model, cfg.load_parameters_path)
        text = evaluate.answer(model, tokenizer, [cfg.generate.prompt],
                               max_new_tokens=cfg.generate.max_decode_length,
                               prefill_length=cfg.generate.max_prefill_length,
                               temperature=cfg.generate.temperature, top_k=cfg.generate.top_k,
                               seed=cfg.seed)[0]
    print(text)
    return 0


def checkpoint_layer(command_line: Sequence[str]):
    """A config layer (config/loader.py): the model keys recorded beside the checkpoint (a
    converted model's or a run's), unless the command line sets model_name or model keys;
    its tokenizer, unless tokenizer_path is set. Applied before validation, so the recorded
    keys are checked as any others."""
    given = {a.partition("=")[0] for a in command_line}

    def layer(values: dict, _above_base: set) -> dict:
        from tpusft.config.loader import absolute_path
        from tpusft.config.schema import MODEL_KEYS
        from tpusft.conversion.convert import find_model_keys
        from tpusft.data.chat import has_tokenizer
        from tpusft.errors import ConfigError

        if not values.get("load_parameters_path"):
            return {}
        path = absolute_path(values["load_parameters_path"])
        keys, assets = find_model_keys(path)
        out = {"load_parameters_path": path}
        if keys and not given & {"model_name", *MODEL_KEYS} and not values.get("demo_task"):
            out.update(keys)
        if not values.get("tokenizer_path") and not values.get("demo_task"):
            if not assets or not has_tokenizer(assets):
                raise ConfigError("tokenizer_path is empty and no tokenizer is recorded beside "
                                  "the checkpoint; set tokenizer_path= to a Hugging Face "
                                  "tokenizer directory")
            out["tokenizer_path"] = assets
        return out

    return layer


def cli() -> None:
    """Console script and `python -m tpusft.generate` entry: one-line errors, tcmalloc."""
    from tpusft.errors import run_cli
    from tpusft.launch import reexec_with_tcmalloc

    reexec_with_tcmalloc("tpusft.generate")
    run_cli(main, usage="tpusft.generate")


if __name__ == "__main__":
    cli()
