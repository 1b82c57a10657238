"""`--help` / `-h` for the config-driven commands: how to call one, what it does, its main
keys with their meaning (from the config schema, so the text cannot drift from it), where
every key is documented, and the exit codes. Printed before any config is read."""

from __future__ import annotations

import textwrap

_COMMON = ("model_name", "load_parameters_path", "tokenizer_path", "run_name",
           "base_output_directory")
_DATA = ("hf_path", "hf_data_files", "hf_eval_files", "data_format", "column_map")
_TRAIN = ("steps", "global_batch_size", "max_target_length", "learning_rate",
          "checkpoint_period", "eval_interval", "remat_policy", "attention", "compile_topology")

# command: (what it does, an example config, its main keys)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "tpusft.train_sft": (
        "Supervised fine-tuning (full, LoRA, QLoRA) and continued pretraining. Re-running "
        "with the same run_name resumes from its last checkpoint.",
        "configs/sft.yml", (*_COMMON, *_DATA, *_TRAIN, "packing", "lora.enable_lora",
                            "lora.rank", "lora.weight_qtype")),
    "tpusft.train_dpo": (
        "Preference training on chosen/rejected pairs: DPO, ORPO or SimPO (dpo.loss_type).",
        "configs/dpo.yml", (*_COMMON, *_DATA, *_TRAIN, "dpo.loss_type", "dpo.beta",
                            "lora.enable_lora", "lora.rank")),
    "tpusft.train_grpo": (
        "GRPO: samples grpo.num_generations completions per prompt, scores them with reward "
        "functions and trains on their advantages.",
        "configs/grpo.yml", (*_COMMON, *_DATA, *_TRAIN, "grpo.reward_functions",
                             "grpo.num_generations", "grpo.max_completion_length",
                             "grpo.beta", "lora.enable_lora")),
    "tpusft.generate": (
        "Samples a reply from a checkpoint with the KV cache (the chat template applied); "
        "the architecture comes from the checkpoint's run when it has one.",
        "configs/demo/sft.yml", ("load_parameters_path", "tokenizer_path", "generate.prompt",
                                 "generate.max_decode_length", "generate.temperature",
                                 "generate.top_k")),
    "tpusft.data": (
        "Inspects the training data as a run would read it: rows read, skipped and truncated, "
        "examples with their trained tokens marked, token lengths, packing; trains nothing.",
        "configs/sft.yml", ("tokenizer_path", *_DATA, "max_target_length", "packing",
                            "inspect_examples")),
    "tpusft.config": (
        "Prints a config resolved (base_config inheritance, presets, key=value overrides); "
        "`--write-base` regenerates configs/base.yml from the schema.",
        "configs/sft.yml", ()),
}

EXIT_CODES = ("exit codes: 0 done; 1 the run cannot go on (training diverged, storage refused "
              "a write, no checkpoint within the preemption deadline; a compile_topology run "
              "that does not fit); 2 bad input (config, data, checkpoint), one line naming what "
              "is wrong and how to fix it")


def text(command: str) -> str:
    """The --help text of `python -m <command>`."""
    from tpusft.config.schema import flat_fields

    summary, example, keys = COMMANDS[command]
    fields = flat_fields()
    wrap = textwrap.TextWrapper(width=100, subsequent_indent="    ")
    lines = [f"usage: python -m {command} CONFIG.yml [key=value ...] [--debug]", "",
             *textwrap.wrap(summary, 100), "",
             f"  CONFIG.yml   a YAML config (e.g. {example}); `base_config:` inherits another",
             "  key=value    sets any config key (nested ones as section.key, lists as [a,b]); "
             "the last one wins",
             "  --debug      a traceback instead of the one-line error",
             "  -h, --help   this text", ""]
    if keys:
        width = max(map(len, keys))
        lines.append("main keys:")
        for key in keys:
            doc = fields[key][0].metadata["doc"]
            lines.append(wrap.fill(f"  {key:<{width}}  {doc}"))
        lines.append("")
    lines += [*textwrap.wrap("every key, with its default and meaning: configs/base.yml; "
                             "`python -m tpusft.config CONFIG.yml key=value` prints a config "
                             "resolved", 100), "", *textwrap.wrap(EXIT_CODES, 100)]
    return "\n".join(lines) + "\n"
