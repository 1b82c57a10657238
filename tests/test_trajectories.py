"""Training trajectories equal transformers': for every family, full and LoRA, tpusft's SFT,
DPO and SimPO take the same steps as a plain PyTorch AdamW loop, TRL's SFTTrainer,
DPOTrainer and CPOTrainer (SimPO, cpo_alpha=0) on the same model and batch: per-step losses
within 1e-5 relative, final weights within 1e-5 (trajectory_oracle.py says how both sides are
set up). The native layout stores some tensors through arithmetic (Llama's query scale,
Gemma's norms and embedding): these tests are what shows that it changes no step.

Settings: AdamW with weight decay, a clipping threshold that binds on some steps only, eps
1e-6 (with 1e-8, a weight whose gradient cancels to ~1e-8 turns float32 noise into a step of
either sign: a few single weights then land 1e-5 apart on otherwise equal runs)."""

import pytest
import trajectory_oracle as oracle
from hf_oracle import TINY

FAMILIES = ("llama3", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
assert set(FAMILIES) <= set(TINY)
MODES = ("full", "lora")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tpusft.demo import arithmetic

    return arithmetic.ensure_assets(str(tmp_path_factory.mktemp("assets"))) / "tokenizer"


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from tpusft.data.chat import load_tokenizer

    return load_tokenizer(str(tokenizer_dir))


def _sft(family, mode, tmp_path, tokenizer_dir, hf_tokenizer, reference: str):
    from tpusft import train_sft
    from tpusft.data import packing

    lora = mode == "lora"
    paths = oracle.prepare(family, tmp_path, lora)
    data = oracle.write_jsonl(tmp_path / "data.jsonl", oracle.sft_rows())
    # The plain loop decays every parameter (torch.optim.AdamW over model.parameters());
    # transformers' Trainer exempts norms and biases, tpusft's default.
    hyper = oracle.Hyper(decay_norms_and_biases=reference == "plain")
    batch = oracle.first_batch(oracle.tpusft_keys(paths, tokenizer_dir, data, tmp_path, hyper,
                                                  48, lora), packing.build_dataset)

    def run(h):
        model = oracle.torch_model(paths, lora)
        if reference == "plain":
            return oracle.plain_sft(model, batch, h, lora)
        return oracle.trl_sft(model, hf_tokenizer, batch, h, tmp_path, lora)

    hyper, ref = oracle.binding_clip(run, hyper)
    keys = oracle.tpusft_keys(paths, tokenizer_dir, data, tmp_path, hyper, 48, lora)
    ours = oracle.run_tpusft(train_sft.main, keys, tmp_path)
    loss_rel, weights = oracle.compare(ours, ref)
    print(f"[trajectory] sft-{reference} {family} {mode}: losses {loss_rel:.1e} relative, "
          f"weights {weights:.1e}, clip {hyper.clip}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_sft_steps_equal_a_pytorch_adamw_loop(family, mode, tmp_path, tokenizer_dir,
                                               hf_tokenizer):
    _sft(family, mode, tmp_path, tokenizer_dir, hf_tokenizer, "plain")


@pytest.mark.parametrize("family,mode", [("llama3", "full"), ("gemma2", "lora")])
def test_sft_steps_equal_trl_sfttrainer(family, mode, tmp_path, tokenizer_dir, hf_tokenizer):
    _sft(family, mode, tmp_path, tokenizer_dir, hf_tokenizer, "trl")


BETA, GAMMA = 0.1, 0.3


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss_type", ["dpo", "simpo"])
def test_preference_steps_equal_trl(loss_type, family, mode, tmp_path, tokenizer_dir,
                                    hf_tokenizer):
    from tpusft import train_dpo
    from tpusft.data import pairs

    lora = mode == "lora"
    paths = oracle.prepare(family, tmp_path, lora)
    data = oracle.write_jsonl(tmp_path / "data.jsonl", oracle.preference_rows())
    method = [f"dpo.loss_type={loss_type}", f"dpo.beta={BETA}", f"dpo.simpo_gamma={GAMMA}"]
    hyper = oracle.Hyper()
    batch = oracle.first_batch(oracle.tpusft_keys(paths, tokenizer_dir, data, tmp_path, hyper,
                                                  80, lora) + method, pairs.build_dataset)

    def run(h):
        model = oracle.torch_model(paths, lora)
        if loss_type == "dpo":
            return oracle.trl_dpo(model, hf_tokenizer, batch, h, tmp_path, lora, BETA)
        return oracle.trl_simpo(model, hf_tokenizer, batch, h, tmp_path, lora, BETA, GAMMA)

    hyper, ref = oracle.binding_clip(run, hyper)
    keys = oracle.tpusft_keys(paths, tokenizer_dir, data, tmp_path, hyper, 80, lora) + method
    ours = oracle.run_tpusft(train_dpo.main, keys, tmp_path)
    loss_rel, weights = oracle.compare(ours, ref)
    print(f"[trajectory] {loss_type} {family} {mode}: losses {loss_rel:.1e} relative, "
          f"weights {weights:.1e}, clip {hyper.clip}")
    if loss_type == "dpo":
        # The policy starts as its reference (TRL's too): every step-1 reward is exactly 0.
        first = ours.records[0]
        assert (first["reward_chosen"], first["reward_rejected"], first["reward_accuracy"]) == (
            0.0, 0.0, 0.0), first
