"""The one typed schema of every config key: its type, default, allowed values and doc.

`configs/base.yml` is generated from this file (`python -m tpusft.config --write-base`) and a
test keeps the two identical, so this module is the single source of truth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def key(default: Any, doc: str, *, choices: tuple | None = None, minimum: float | None = None,
        section: str | None = None):
    """A schema entry: default value plus metadata used for validation and base.yml."""
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "section": section}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


DEFAULT_LOGICAL_AXIS_RULES = [
    # MaxText-style rules: logical axis name -> mesh axes (or null = replicated).
    ["activation_batch", ["data", "fsdp"]],
    ["activation_length", None],
    ["activation_embed", None],
    ["activation_heads", "tensor"],
    ["activation_kv_heads", "tensor"],
    ["activation_mlp", "tensor"],
    ["activation_vocab", "tensor"],
    ["vocab", "tensor"],
    ["embed", "fsdp"],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["head_dim", None],
    ["mlp", "tensor"],
    ["layers", None],
    ["norm", None],
]


@dataclass(frozen=True)
class LoraConfig:
    """The `lora.` section: low-rank adapters on the frozen (optionally quantized) base."""

    enable_lora: bool = key(False, "Train LoRA adapters instead of the whole model; only the "
                            "adapters get gradients and optimizer state.", section="LoRA")
    rank: int = key(16, "Rank of each adapter.", minimum=1)
    alpha: float = key(32.0, "Adapter output scale is alpha / rank.", minimum=0)
    dropout: float = key(0.0, "Dropout on each adapter's input in training steps (PEFT's "
                         "lora_dropout); evaluation and generation use none.", minimum=0)
    target_modules: str | list = key(
        "all-linear", "Projections that get adapters: a list of q_proj, k_proj, v_proj, "
        "o_proj, gate_proj, up_proj, down_proj (or MaxText's query, key, value, out, wi_0, "
        "wi_1, wo), or all-linear, attention, mlp.")
    weight_qtype: str = key(
        "", "QLoRA: store the frozen layer kernels quantized with Qwix, nf4 (4-bit NormalFloat, "
        "blocks of 64) or int8; adapters stay in dtype. Empty: full precision.",
        choices=("", "nf4", "int8"))
    adapter_path: str = key(
        "", "Start from these adapters: a PEFT adapter directory, or a native adapter "
        "checkpoint (hf_to_native.py of a PEFT adapter). Empty: new adapters.")


@dataclass(frozen=True)
class DpoConfig:
    """The `dpo.` section: preference training (`python -m tpusft.train_dpo`)."""

    loss_type: str = key(
        "dpo", "dpo (against a reference model: the base weights under LoRA, else a frozen "
        "copy of the starting weights), orpo (odds ratio plus the chosen side's NLL, no "
        "reference) or simpo (length-normalised margin with target gamma, no reference).",
        choices=("dpo", "orpo", "simpo"), section="Preference training (DPO, ORPO, SimPO)")
    beta: float = key(0.1, "DPO: weight of the log-ratio to the reference (the KL strength); "
                      "SimPO: scale of the length-normalised reward.", minimum=0)
    label_smoothing: float = key(
        0.0, "Probability that a pair's preference is flipped (conservative DPO); applies to "
        "DPO, SimPO and ORPO's odds-ratio term.", minimum=0)
    simpo_gamma: float = key(0.5, "SimPO: target reward margin gamma.", minimum=0)
    orpo_lambda: float = key(0.1, "ORPO: weight of the odds-ratio term against the chosen "
                             "side's NLL.", minimum=0)


@dataclass(frozen=True)
class GenerateConfig:
    """The `generate.` section: sampling with `python -m tpusft.generate`."""

    prompt: str = key("", "User message for `python -m tpusft.generate` (the chat template is "
                      "applied).", section="Generation (python -m tpusft.generate)")
    max_prefill_length: int = key(256, "Prompt tokens reserved in the KV cache.", minimum=1)
    max_decode_length: int = key(64, "New tokens to generate.", minimum=1)
    temperature: float = key(0.0, "Sampling temperature; 0 is greedy.", minimum=0)
    top_k: int = key(0, "Sample from the k most likely tokens (0: all).", minimum=0)


@dataclass(frozen=True)
class GrpoConfig:
    """The `grpo.` section: GRPO and its variants (`python -m tpusft.train_grpo`)."""

    loss_algo: str = key(
        "grpo", "GRPO variant (Tunix's learners): grpo, gspo-token (sequence-level importance "
        "ratio), drgrpo (Dr. GRPO: no std normalisation, length-unbiased loss), dapo (clip-"
        "higher, token-mean loss, no KL term).", choices=("grpo", "gspo-token", "drgrpo", "dapo"),
        section="GRPO (python -m tpusft.train_grpo)")
    num_generations: int = key(4, "Completions sampled per prompt (the group G).", minimum=2)
    num_iterations: int = key(1, "Policy updates per batch of rollouts (mu).", minimum=1)
    beta: float = key(0.04, "Weight of the KL penalty to the reference model (0: no reference "
                      "model is kept).", minimum=0)
    epsilon: float = key(0.2, "Clipping range of the importance ratio.", minimum=0)
    epsilon_high: float = key(0.28, "DAPO: upper clipping range (clip-higher).", minimum=0)
    temperature: float = key(1.0, "Rollout sampling temperature.", minimum=0)
    top_p: float = key(1.0, "Rollout nucleus sampling (1: off).", minimum=0)
    top_k: int = key(0, "Rollouts sample from the k most likely tokens (0: all).", minimum=0)
    max_prompt_length: int = key(
        256, "Prompt tokens; longer prompts are cut from the left, or dropped with "
        "truncation=drop (counted either way).", minimum=1)
    max_completion_length: int = key(256, "Tokens generated per completion.", minimum=1)
    rollout_engine: str = key("vanilla", "Rollout engine: Tunix's sampler driving tpusft's "
                              "model and KV cache (every backend).", choices=("vanilla",))
    reward_functions: list = key(
        ["answer_correct"], "Rewards, summed with reward_weights: answer_correct, "
        "answer_format, length_penalty, or 'module:function' with the signature "
        "fn(prompts, completions, **columns) -> list[float] (columns: answer, mode).")
    reward_weights: list = key([], "One weight per reward function (empty: all 1).")
    format_pattern: str = key(
        r"<reasoning>.+</reasoning>\s*<answer>.+</answer>",
        "answer_format: regular expression a whole completion must match.")
    length_penalty_start: int = key(
        0, "length_penalty: tokens allowed before the penalty starts (0: half of "
        "max_completion_length).", minimum=0)
    system_prompt: str = key("", "System message added to every prompt (empty: none).")
    prompt_template: str = key("{prompt}", "The user turn, with {prompt} replaced by "
                               "the data set's prompt or question.")
    eval_prompts: int = key(128, "Held-out prompts decoded greedily for accuracy before "
                            "training, every eval_interval steps and at the end (0: none).",
                            minimum=0)


@dataclass(frozen=True)
class Config:
    # ------------------------------------------------------------------ run
    run_name: str | None = key(
        None, "Name of this run; outputs go to base_output_directory/run_name. Default: a "
        "timestamp. Re-running with the same run_name resumes from its last checkpoint.",
        section="Run and outputs")
    base_output_directory: str = key(
        "runs", "Root of all run outputs: a local path or gs://bucket/path.")
    print_config: bool = key(False, "Print the fully resolved config and exit.")
    seed: int = key(0, "Seed for parameter initialisation.")
    log_period: int = key(10, "Print a progress line every this many steps.", minimum=1)
    tensorboard_library_scalars: bool = key(
        False, "Also write the libraries' own TensorBoard scalars (JAX compile times, Orbax "
        "write speeds, Tunix's GRPO rewards/ and completions/) beside tpusft's train/ and "
        "eval/ ones.")

    # ---------------------------------------------------------------- model
    model_name: str = key(
        "demo-tiny", "Model preset from configs/models/<model_name>.yml; its keys fill the "
        "architecture keys below unless they are set explicitly.", section="Model")
    model_family: str = key(
        "llama3", "Decoder family: llama3 (Llama 3.x, SmolLM2), mistral, qwen2 (Qwen2/2.5), "
        "qwen3, gemma2, gemma3 (Gemma 3 text).",
        choices=("llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"))
    vocab_size: int = key(32000, "Vocabulary size (rows of the embedding).", minimum=1)
    base_emb_dim: int = key(2048, "Hidden size.", minimum=1)
    base_num_decoder_layers: int = key(16, "Number of decoder layers.", minimum=1)
    base_num_query_heads: int = key(32, "Number of query heads.", minimum=1)
    base_num_kv_heads: int = key(8, "Number of key/value heads (GQA when fewer than query "
                                 "heads).", minimum=1)
    head_dim: int = key(64, "Dimension of each attention head.", minimum=1)
    base_mlp_dim: int = key(8192, "Hidden size of the gated MLP.", minimum=1)
    normalization_layer_epsilon: float = key(1e-5, "RMSNorm epsilon.", minimum=0)
    rope_max_timescale: float = key(500000.0, "RoPE base (HF rope_theta).", minimum=1)
    rope_type: str = key("llama3", "RoPE frequency scaling (of global layers on Gemma 3).",
                         choices=("default", "llama3", "linear"))
    rope_scaling_factor: float = key(8.0, "llama3 and linear RoPE: scaling factor.", minimum=1)
    rope_low_freq_factor: float = key(1.0, "llama3 RoPE: low frequency factor.", minimum=0)
    rope_high_freq_factor: float = key(4.0, "llama3 RoPE: high frequency factor.", minimum=0)
    rope_original_max_position: int = key(
        8192, "llama3 RoPE: original context length the scaling refers to.", minimum=1)
    local_rope_max_timescale: float = key(
        0.0, "RoPE base of sliding-window layers (Gemma 3's rope_local_base_freq; no "
        "scaling). 0: rope_max_timescale.", minimum=0)
    sliding_window_size: int = key(
        0, "Sliding-window attention span in tokens (Gemma's local layers; every layer on "
        "Mistral and Qwen). 0: full attention.", minimum=0)
    attn_logits_soft_cap: float = key(
        0.0, "Cap attention scores with c*tanh(s/c) (Gemma 2). 0: off.", minimum=0)
    final_logits_soft_cap: float = key(
        0.0, "Cap output logits with c*tanh(l/c) (Gemma 2). 0: off.", minimum=0)
    query_pre_attn_scalar: float = key(
        0.0, "Attention scores are scaled by query_pre_attn_scalar**-0.5 (Gemma). "
        "0: head_dim.", minimum=0)
    logits_via_embedding: bool = key(
        False, "Tie the output projection to the token embedding (HF tie_word_embeddings).")
    attention_bias: bool = key(
        False, "Biases on the query, key, value and output projections (HF attention_bias on "
        "Llama, Qwen3 and Gemma configs). Qwen2's query/key/value biases are part of its "
        "family and need no key.")
    mlp_bias: bool = key(False, "Biases on the MLP's gate, up and down projections (HF "
                         "mlp_bias on Llama configs).")
    dtype: str = key("bfloat16", "Compute (activation) dtype.",
                     choices=("float32", "bfloat16", "float16"))
    weight_dtype: str = key("float32", "Parameter (and optimizer state) dtype.",
                            choices=("float32", "bfloat16"))
    scan_layers: bool = key(True, "Stack decoder layers and run them with jax.lax.scan: one "
                            "layer is compiled, not num_layers.")
    remat_policy: str = key(
        "full", "Activation rematerialisation per layer: none (keep all), minimal (keep matmul "
        "outputs), full (keep only layer inputs).", choices=("none", "minimal", "full"))
    num_vocab_tiling: int = key(
        0, "Chunks of each sequence that the output layer and the loss run in, one after "
        "another, each computing its own gradients, so no step holds the whole batch's logits "
        "(must divide max_target_length). 0 picks the fewest, a power of two, that keep one "
        "chunk's float32 logits per device within 128 MiB.", minimum=0)
    attention: str = key(
        "auto", "Attention kernel: auto (splash on TPU where it can serve, cuDNN on GPU, XLA "
        "elsewhere), xla, cudnn, or splash (the Pallas TPU kernel; interpreted, slowly, on "
        "CPU).", choices=("auto", "xla", "cudnn", "splash"))
    load_parameters_path: str = key(
        "", "Native checkpoint to start from (a converted checkpoint directory, a training "
        "run's checkpoints/ or one of its steps). Empty: random initialisation.")

    # ----------------------------------------------------------------- mesh
    ici_data_parallelism: int = key(
        1, "Devices on the data axis (pure data parallelism). -1: all remaining devices.",
        section="Mesh and sharding")
    ici_fsdp_parallelism: int = key(
        -1, "Devices on the fsdp axis (params, grads and optimizer state sharded, batch "
        "split). -1: all remaining devices.")
    ici_tensor_parallelism: int = key(
        1, "Devices on the tensor axis (heads and MLP sharded). -1: all remaining devices.")
    dcn_data_parallelism: int = key(
        1, "Slices on the data axis of a multi-slice run (the mesh's axis is dcn * ici "
        "devices; ici_* then count the devices of one slice). -1: all remaining slices.")
    dcn_fsdp_parallelism: int = key(
        1, "Slices on the fsdp axis of a multi-slice run. -1: all remaining slices.")
    dcn_tensor_parallelism: int = key(
        1, "Slices on the tensor axis of a multi-slice run. -1: all remaining slices.")
    logical_axis_rules: list = key(
        DEFAULT_LOGICAL_AXIS_RULES, "Logical axis -> mesh axes. A dimension whose size the "
        "mesh axes do not divide is replicated instead.")

    # -------------------------------------------------------- multi-process
    coordinator_address: str = key(
        "", "host:port of process 0 in a multi-process run (else JAX_COORDINATOR_ADDRESS). "
        "Empty with num_processes and process_id unset: one process, unless the environment "
        "names a run.", section="Multi-process runs")
    num_processes: int | None = key(None, "Processes in the run (else JAX_NUM_PROCESSES).",
                                    minimum=1)
    process_id: int | None = key(None, "This process's index, 0 .. num_processes-1 (else "
                                 "JAX_PROCESS_ID).", minimum=0)
    distributed: bool = key(
        False, "Join the run's processes with jax.distributed even when no key or variable "
        "names the coordinator (JAX finds it on TPU pod slices, SLURM, ...). A TPU pod whose "
        "TPU_WORKER_HOSTNAMES names several hosts joins without it.")
    distributed_timeout_s: int = key(
        300, "Seconds to wait for every process to join, and after which a process that "
        "stopped answering ends the run.", minimum=10)
    data_sharding: str = key(
        "process", "How several processes read the data: process (each reads its own 1/N of "
        "the rows and builds its part of every batch: scales with hosts; resuming on another "
        "process count restarts the data's epoch) or global (each reads every row, builds the "
        "whole batch and keeps its part: batches, losses and the data position are those of a "
        "one-process run, on any process count).", choices=("process", "global"))

    # ----------------------------------------------------------------- data
    hf_path: str = key(
        "", "Hugging Face dataset: a hub name (streamed), 'json'/'parquet'/'csv' with "
        "hf_data_files, or a local directory saved with save_to_disk.", section="Data")
    hf_name: str | None = key(None, "Dataset config name on the hub (load_dataset's name).")
    hf_data_files: str | list | None = key(
        None, "Data file(s) for hf_path=json/parquet/csv; a path, glob or list.")
    hf_eval_files: str | list | None = key(
        None, "Eval file(s) for hf_path=json/parquet/csv, when the eval split is a separate "
        "file.")
    train_split: str = key("train", "Split used for training.")
    eval_split: str | None = key(None, "Split used for evaluation (null: no eval data).")
    data_format: str = key(
        "auto", "Row format, or auto (detected from the columns): messages ({role, content} "
        "lists), sharegpt (conversations of {from, value}), alpaca (instruction/input/output), "
        "prompt_completion, question_answer (GSM8K), text (continued pretraining), preference "
        "(prompt/chosen/rejected, DPO), prompt_only (GRPO).",
        choices=("auto", "messages", "sharegpt", "alpaca", "prompt_completion",
                 "question_answer", "text", "preference", "prompt_only"))
    column_map: dict | None = key(
        None, "Read a format's fields from other columns: {field: column}, e.g. "
        "{instruction: prompt, output: response}.")
    dataset: str | list | None = key(
        None, "Data set(s) by name from dataset_registry, replacing hf_path and friends: "
        "'alpaca_en', or a weighted mixture 'alpaca_en:0.7,gsm8k:0.3' (or a list of names "
        "and {name, weight} mappings).")
    dataset_registry: str = key(
        "configs/datasets.yml", "YAML file of named data sets: name -> {hf_path, data_files, "
        "hf_name, split, eval_split, eval_files, data_format, column_map, max_samples}. "
        "Relative data_files are relative to the registry file.")
    max_samples: int | None = key(None, "Read at most this many rows of each data set.",
                                  minimum=1)
    eval_fraction: float = key(
        0.0, "Hold out this fraction of the training split (seeded by shuffle_seed) as eval "
        "data, when the data set has no eval split.", minimum=0)
    tokenizer_path: str = key("", "Hugging Face tokenizer directory (with a chat template for "
                              "chat formats).")
    max_target_length: int = key(2048, "Tokens per training sequence; longer examples are "
                                 "truncated.", minimum=2)
    packing: bool = key(True, "Pack several examples into each sequence (segment ids keep them "
                        "from attending to each other).")
    packing_strategy: str = key(
        "best_fit", "best_fit (each example into the fullest bin it fits), first_fit, or "
        "concat_then_split (continued pretraining: rows joined and cut at max_target_length).",
        choices=("best_fit", "first_fit", "concat_then_split"))
    truncation: str = key(
        "right", "Examples longer than max_target_length: right (keep the start), left (keep "
        "the end) or drop (skip them, counted as bad rows).", choices=("right", "left", "drop"))
    bad_row_policy: str = key(
        "skip", "Rows with a missing column, empty content, a wrong type or an invalid role "
        "order: skip (counted and reported, one example each) or raise (stop at the first).",
        choices=("skip", "raise"))
    sft_train_on_completion_only: bool = key(
        True, "Train only on assistant tokens (prompt, system and user tokens are masked).")
    shuffle_seed: int = key(0, "Seed of the data order.")
    num_epochs: int | None = key(None, "Passes over the training data; null: repeat until "
                                 "`steps`.", minimum=1)
    inspect_examples: int = key(
        3, "Examples printed, with their trained tokens marked, by `python -m tpusft.data`.",
        minimum=0)
    demo_task: str = key(
        "", "Embedded demo: 'arithmetic' generates a tokenizer and a chat data set of sums "
        "under base_output_directory/demo_assets and reports exact-match answers before and "
        "after training; 'arithmetic_preference' trains on preference pairs of the same sums "
        "(the right one against a near miss) instead.",
        choices=("", "arithmetic", "arithmetic_preference"))

    # ------------------------------------------------------------- training
    steps: int = key(1000, "Optimizer steps to train for.", minimum=1, section="Training")
    global_batch_size: int = key(
        8, "Sequences per optimizer step (after packing), summed over accumulation steps.",
        minimum=1)
    gradient_accumulation_steps: int = key(
        1, "Micro-batches per optimizer step; the loss is normalised over all tokens of the "
        "step.", minimum=1)
    learning_rate: float = key(2e-5, "Peak learning rate.", minimum=0)
    warmup_steps_fraction: float = key(0.05, "Fraction of steps of linear warmup.", minimum=0)
    learning_rate_final_fraction: float = key(
        0.1, "Final learning rate as a fraction of the peak (cosine decay).", minimum=0)
    adam_b1: float = key(0.9, "AdamW beta1.", minimum=0)
    adam_b2: float = key(0.95, "AdamW beta2.", minimum=0)
    adam_eps: float = key(1e-8, "AdamW epsilon.", minimum=0)
    adam_weight_decay: float = key(0.0, "AdamW decoupled weight decay.", minimum=0)
    adam_weight_decay_norms_and_biases: bool = key(
        False, "Decay RMSNorm scales and biases too (torch.optim.AdamW over all parameters); "
        "false: as transformers' Trainer, which exempts them.")
    gradient_clipping_threshold: float = key(1.0, "Clip gradients to this global norm (0: "
                                             "off).", minimum=0)
    eval_interval: int = key(0, "Evaluate every this many steps and after the last (0: only "
                             "when a run ends).",
                             minimum=0)
    eval_steps: int | None = key(None, "Eval batches per evaluation (null: the whole eval "
                                 "split).", minimum=1)
    peak_tflops: float | None = key(
        None, "Peak TFLOP/s per device for MFU. null: the chip's published bf16 peak (TPU/GPU) "
        "or a matmul measured at start (CPU).", minimum=0)

    # ---------------------------------------------------------- checkpoints
    enable_checkpointing: bool = key(True, "Write Orbax checkpoints under run_name/checkpoints.",
                                     section="Checkpoints")
    checkpoint_period: int = key(500, "Save a checkpoint every this many steps (and at the end).",
                                 minimum=1)
    max_num_checkpoints_to_keep: int = key(3, "Older checkpoints are deleted.", minimum=1)
    async_checkpointing: bool = key(True, "Write checkpoints in the background.")

    # ---------------------------------------------------------- reliability
    preemption_deadline_s: float = key(
        25.0, "On SIGTERM/SIGINT the run saves the current step and exits 0; if that takes "
        "longer than this, it exits 1 without the checkpoint (a second signal exits at once).",
        minimum=1, section="Reliability")
    watch_maintenance_events: bool = key(
        False, "Poll the GCE metadata server for maintenance and preemption events and treat "
        "one like SIGTERM (for GCE VMs; off elsewhere).")
    nan_policy: str = key(
        "stop", "A non-finite loss or gradient norm: stop (one line, no checkpoint after it) or "
        "skip_step (the update is dropped and counted).", choices=("stop", "skip_step"))
    max_skipped_steps: int = key(10, "nan_policy=skip_step: stop after this many skipped steps "
                                 "in a row.", minimum=1)

    # ------------------------------------------------------------- profiler
    profiler: str = key("", "'xplane' captures a trace for TensorBoard's profile plugin.",
                        choices=("", "xplane"), section="Profiler")
    skip_first_n_steps_for_profiler: int = key(2, "Steps to run before the trace starts "
                                               "(skips compilation).", minimum=0)
    profiler_steps: int = key(3, "Steps captured in the trace.", minimum=1)

    # ----------------------------------------------------- compile-only runs
    compile_topology: str = key(
        "", "Compile the run's step for this TPU topology (v4-8 ..., v5e-1 ... v5e-256, v5p-8 "
        "..., v6e-1 ... v6e-256, tpu7x-8 ...) from shapes alone, on any machine, print its "
        "per-chip memory and whether it fits, and exit (0 fits, 1 does not). Nothing is read "
        "or trained. Empty: a normal run.", section="Compile-only runs (will it fit?)")
    compile_topology_num_slices: int = key(1, "Slices of compile_topology (multi-slice "
                                           "runs; the dcn_* keys split the mesh over them).",
                                           minimum=1)

    # ----------------------------------------------------------------- LoRA
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"nested": True})

    # ----------------------------------------------------------- preference
    dpo: DpoConfig = field(default_factory=DpoConfig, metadata={"nested": True})

    # ----------------------------------------------------------------- GRPO
    grpo: GrpoConfig = field(default_factory=GrpoConfig, metadata={"nested": True})

    # ----------------------------------------------------------- generation
    generate: GenerateConfig = field(default_factory=GenerateConfig,
                                     metadata={"nested": True})

    # ------------------------------------------------------- derived paths
    # Set by the loader, not by the user.
    run_directory: str = field(default="", metadata={"derived": True})
    checkpoint_directory: str = field(default="", metadata={"derived": True})
    tensorboard_directory: str = field(default="", metadata={"derived": True})
    profile_directory: str = field(default="", metadata={"derived": True})

    def to_dict(self, include_derived: bool = True) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if not include_derived:
            for f in dataclasses.fields(self):
                if f.metadata.get("derived"):
                    out.pop(f.name)
        return out


# Keys that moved into a section: old top-level name -> its name now. A config or command line
# that still uses one is refused with one line naming the new key.
MOVED_KEYS = {
    **{name: f"grpo.{name}" for name in (
        "loss_algo", "num_generations", "num_iterations", "beta", "epsilon", "epsilon_high",
        "temperature", "top_p", "top_k", "max_prompt_length", "max_completion_length",
        "rollout_engine", "reward_functions", "reward_weights", "format_pattern",
        "length_penalty_start", "system_prompt", "prompt_template", "eval_prompts")},
    "prompt": "generate.prompt", "max_prefill_length": "generate.max_prefill_length",
    "max_decode_length": "generate.max_decode_length",
    "decode_temperature": "generate.temperature", "decode_top_k": "generate.top_k",
}

# Keys a model preset may set.
MODEL_KEYS = (
    "model_family", "vocab_size", "base_emb_dim", "base_num_decoder_layers",
    "base_num_query_heads", "base_num_kv_heads", "head_dim", "base_mlp_dim",
    "normalization_layer_epsilon", "rope_max_timescale", "rope_type", "rope_scaling_factor",
    "rope_low_freq_factor", "rope_high_freq_factor", "rope_original_max_position",
    "local_rope_max_timescale", "sliding_window_size", "attn_logits_soft_cap",
    "final_logits_soft_cap", "query_pre_attn_scalar", "logits_via_embedding", "attention_bias",
    "mlp_bias",
)


def user_fields() -> list[dataclasses.Field]:
    """Top-level keys (nested sections excluded; see flat_fields)."""
    return [f for f in dataclasses.fields(Config)
            if not f.metadata.get("derived") and not f.metadata.get("nested")]


def sections() -> dict[str, type]:
    """Nested sections: name -> dataclass (their keys are written `section.key`)."""
    return {f.name: f.default_factory().__class__ for f in dataclasses.fields(Config)
            if f.metadata.get("nested")}


def flat_fields() -> dict[str, tuple[dataclasses.Field, Any]]:
    """Every user key, nested ones as `section.key`: name -> (field, type hint)."""
    import typing

    out = {f.name: (f, typing.get_type_hints(Config)[f.name]) for f in user_fields()}
    for name, cls in sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{name}.{f.name}"] = (f, hints[f.name])
    return out
