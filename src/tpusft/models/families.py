"""What distinguishes one decoder family from another: a few switches on one implementation.

Each family also fixes how its weights sit in the native (MaxText) layout: parameter names,
RoPE order, whether 1/sqrt(head_dim) is folded into the query kernel, whether the embedding
is stored pre-multiplied by sqrt(emb_dim), and how layers that differ (sliding-window versus
global attention) are grouped so that they can still be scanned:

  * 'single': every layer alike; scanned as decoder/layers (layer axis 1), else layers_{i}.
  * 'suffix' (Gemma 2): a local and a global layer form one block whose parameters carry the
    suffixes _local / _global; scanned over blocks as decoder/layers, else layers_{block}.
  * 'nested' (Gemma 3): blocks of `period` layers, decoder/layers/layers_{j} scanned over
    blocks, the leftover layers unscanned in decoder/layers_remainder/layers_{j}; unscanned,
    every layer is decoder/layers_{i}.
"""

from __future__ import annotations

import dataclasses

# Roles of a layer's norms.
ATTN_NORM, MLP_NORM, POST_ATTN_NORM, POST_MLP_NORM = "attn", "mlp", "post_attn", "post_mlp"

_LLAMA_NORMS = {ATTN_NORM: "pre_self_attention_layer_norm",
                MLP_NORM: "post_self_attention_layer_norm"}
_GEMMA_NORMS = {ATTN_NORM: "pre_self_attention_norm", POST_ATTN_NORM: "post_self_attention_norm",
                MLP_NORM: "pre_ffw_norm", POST_MLP_NORM: "post_ffw_norm"}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    hf_model_type: str
    hf_architecture: str
    norms: dict[str, str]            # role -> native parameter name
    rope_interleaved: bool = False   # native q/k kernels in MaxText's interleaved RoPE order
    query_prescaled: bool = False    # 1/sqrt(head_dim) folded into the query kernel
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_offset: bool = False        # HF stores (scale - 1); native stores the scale itself
    embed_scaled: bool = False       # native embedding = HF embedding * sqrt(emb_dim)
    activation: str = "silu"         # gate activation of the gated MLP
    block_style: str = "single"
    period: int = 1                  # layers per scanned block
    hf_bias_fields: tuple[str, ...] = ()  # optional biases the HF config can switch on

    @property
    def sandwich_norms(self) -> bool:
        return POST_ATTN_NORM in self.norms

    def is_local(self, layer: int, sliding_window: int) -> bool:
        """Whether layer `layer` uses sliding-window attention."""
        if self.name == "gemma2":
            return layer % 2 == 0
        if self.name == "gemma3":
            return (layer + 1) % 6 != 0
        return sliding_window > 0


FAMILIES = {f.name: f for f in [
    Family("llama3", "llama", "LlamaForCausalLM", _LLAMA_NORMS, rope_interleaved=True,
           query_prescaled=True, hf_bias_fields=("attention_bias", "mlp_bias")),
    Family("mistral", "mistral", "MistralForCausalLM", _LLAMA_NORMS, rope_interleaved=True,
           query_prescaled=True),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", _LLAMA_NORMS, qkv_bias=True),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", _LLAMA_NORMS, qk_norm=True,
           hf_bias_fields=("attention_bias",)),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", _GEMMA_NORMS, query_prescaled=True,
           norm_offset=True, embed_scaled=True, activation="gelu_tanh", block_style="suffix",
           period=2, hf_bias_fields=("attention_bias",)),
    Family("gemma3", "gemma3_text", "Gemma3ForCausalLM", _GEMMA_NORMS, qk_norm=True,
           norm_offset=True, embed_scaled=True, activation="gelu_tanh", block_style="nested",
           period=6, hf_bias_fields=("attention_bias",)),
]}

GEMMA2_SUFFIXES = ("_local", "_global")


def block_counts(family: Family, num_layers: int) -> tuple[int, int]:
    """(scanned blocks, leftover unscanned layers) for a scanned model."""
    return num_layers // family.period, num_layers % family.period
