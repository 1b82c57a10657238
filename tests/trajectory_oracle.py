"""Training trajectories next to transformers': the same tiny random model, the same batch
repeated for a few steps, tpusft's run (its command's main, in this process) beside a plain
PyTorch AdamW loop on the transformers model, TRL's SFTTrainer, DPOTrainer (DPO) and
CPOTrainer (SimPO, cpo_alpha=0), full or with PEFT LoRA adapters.

Both sides start from the same weights (the HF model converted with hf_to_native.py; a PEFT
adapter loaded through lora.adapter_path) and train on the same token ids: tpusft's data
pipeline encodes the rows, and the PyTorch side is handed those ids (TRL's tokenization is not
what is compared). Learning rate constant, float32, no dropout."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from conftest import REPO

CONFIGS = REPO / "configs"
STEPS = 8
BATCH = 8
LORA = {"rank": 4, "alpha": 8.0}


@dataclass(frozen=True)
class Hyper:
    """The optimizer settings both sides use."""

    learning_rate: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    weight_decay: float = 0.5
    clip: float = 1.0
    decay_norms_and_biases: bool = False  # True: torch.optim.AdamW over model.parameters()

    def keys(self) -> list[str]:
        return [f"learning_rate={self.learning_rate}", "warmup_steps_fraction=0",
                "learning_rate_final_fraction=1", f"adam_b1={self.b1}", f"adam_b2={self.b2}",
                f"adam_eps={self.eps}", f"adam_weight_decay={self.weight_decay}",
                f"adam_weight_decay_norms_and_biases={str(self.decay_norms_and_biases).lower()}",
                f"gradient_clipping_threshold={self.clip}"]


@dataclass
class Trajectory:
    losses: list[float]
    weights: dict[str, np.ndarray]          # HF names (PEFT names for adapters)
    grad_norms: list[float] = field(default_factory=list)  # before clipping (reference only)
    records: list[dict] = field(default_factory=list)      # tpusft's metrics.jsonl train rows


# ----------------------------------------------------------------------------- data
def sft_rows() -> list[dict]:
    pairs = [(1, 2), (13, 29), (40, 4), (7, 7), (22, 31), (5, 48), (17, 3), (30, 30)]
    return [{"messages": [{"role": "user", "content": f"{a}+{b}=?"},
                          {"role": "assistant", "content": f"it is {a + b}"}]}
            for a, b in pairs]


def preference_rows() -> list[dict]:
    pairs = [(1, 2), (13, 29), (40, 4), (7, 7), (22, 31), (5, 48), (17, 3), (30, 30)]
    wrong = ["no idea", "it is 43", "4", "it is 15, i think", "53", "it is 52", "21", "60?"]
    return [{"prompt": f"{a}+{b}=?", "chosen": f"it is {a + b}", "rejected": w}
            for (a, b), w in zip(pairs, wrong, strict=True)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- models
def prepare(family: str, root: Path, lora: bool) -> dict:
    """The HF model saved and converted, and (lora) a PEFT adapter with random A and small
    random B, so both matrices train from the first step."""
    import torch
    from hf_oracle import build_hf_model

    from tpusft.conversion.convert import hf_to_native

    root.mkdir(parents=True, exist_ok=True)
    hf = build_hf_model(family)
    hf.save_pretrained(root / "hf")
    hf_to_native(str(root / "hf"), str(root / "native"), log=lambda *a: None)
    out = {"hf": root / "hf", "native": root / "native"}
    if lora:
        import peft

        torch.manual_seed(1)
        model = peft.get_peft_model(hf, peft_config())
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn_like(p))
        model.save_pretrained(root / "adapter")
        out["adapter"] = root / "adapter"
    return out


def peft_config():
    import peft

    return peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                           "up_proj", "down_proj"])


def torch_model(paths: dict, lora: bool):
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        paths["hf"], dtype=torch.float32, attn_implementation="eager")
    if lora:
        model = peft.PeftModel.from_pretrained(model, paths["adapter"], is_trainable=True)
    model.train()
    return model


def torch_weights(model, lora: bool) -> dict[str, np.ndarray]:
    if lora:
        import peft

        state = peft.get_peft_model_state_dict(model)
        return {f"base_model.model.{k.removeprefix('base_model.model.')}": v.detach().numpy()
                for k, v in state.items()}
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- tpusft
def tpusft_keys(paths: dict, tokenizer: Path, data: Path, root: Path, hyper: Hyper,
                length: int, lora: bool) -> list[str]:
    keys = [f"model_name={paths['native']}/tpusft_model.yml",
            f"load_parameters_path={paths['native']}", f"tokenizer_path={tokenizer}",
            "hf_path=json", f"hf_data_files={data}", f"steps={STEPS}",
            f"global_batch_size={BATCH}", f"max_target_length={length}", "packing=false",
            "dtype=float32", "remat_policy=none", f"checkpoint_period={STEPS}", "log_period=1",
            "async_checkpointing=false", f"base_output_directory={root}", "run_name=tpusft",
            *hyper.keys()]
    if lora:
        keys += ["lora.enable_lora=true", f"lora.rank={LORA['rank']}",
                 f"lora.alpha={LORA['alpha']}", f"lora.adapter_path={paths['adapter']}"]
    return keys


def run_tpusft(main, keys: list[str], root: Path) -> Trajectory:
    """A tpusft command's main in this process; its per-step losses and its last
    checkpoint exported to HF (and PEFT) tensors."""
    from conftest import run_in_process
    from hf_oracle import hf_tensors

    from tpusft.conversion.convert import native_to_hf

    result = run_in_process(main, str(CONFIGS / "base.yml"), *keys)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    run = root / "tpusft"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r["kind"] == "train"]
    native_to_hf(str(run / "checkpoints"), str(root / "export"), log=lambda *a: None)
    adapter = root / "export" / "adapter"
    weights = hf_tensors(adapter if adapter.exists() else root / "export")
    return Trajectory([r["loss"] for r in records], weights, records=records)


def first_batch(keys: list[str], build) -> dict:
    """The batch tpusft trains on (every row; its order within the batch aside)."""
    from tpusft.config import load_config
    from tpusft.data.chat import load_tokenizer
    from tpusft.training.setup import train_and_eval_data

    cfg = load_config([str(CONFIGS / "base.yml"), *keys])
    train, _, _ = train_and_eval_data(cfg, load_tokenizer(cfg.tokenizer_path), build)
    return next(iter(train))


# ----------------------------------------------------------------------------- references
def adamw(model, hyper: Hyper):
    """torch.optim.AdamW over every parameter (decaying norms and biases too)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=hyper.learning_rate, betas=(hyper.b1, hyper.b2),
                             eps=hyper.eps, weight_decay=hyper.weight_decay)


def plain_sft(model, batch: dict, hyper: Hyper, lora: bool) -> Trajectory:
    """A plain PyTorch loop: token-mean cross-entropy over the trained tokens, clipping by
    global norm, AdamW."""
    import torch

    inputs = torch.tensor(batch["inputs"], dtype=torch.long)
    targets = torch.tensor(batch["targets"], dtype=torch.long)
    weights = torch.tensor(batch["weights"], dtype=torch.float32)
    mask = torch.tensor(batch["segment_ids"] > 0, dtype=torch.long)
    positions = torch.tensor(batch["positions"], dtype=torch.long)
    opt = adamw(model, hyper)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, norms = [], []
    for _ in range(STEPS):
        logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions).logits
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                reduction="none")
        loss = (nll * weights.flatten()).sum() / weights.sum()
        opt.zero_grad()
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, hyper.clip)))
        opt.step()
        losses.append(loss.item())
    return Trajectory(losses, torch_weights(model, lora), norms)


def _training_args(cls, root: Path, hyper: Hyper, **extra):
    return cls(output_dir=str(root / "trl"), per_device_train_batch_size=BATCH,
               gradient_accumulation_steps=1, max_steps=STEPS, learning_rate=hyper.learning_rate,
               lr_scheduler_type="constant", warmup_steps=0, weight_decay=hyper.weight_decay,
               adam_beta1=hyper.b1, adam_beta2=hyper.b2, adam_epsilon=hyper.eps,
               max_grad_norm=hyper.clip, optim="adamw_torch", logging_steps=1, report_to="none",
               save_strategy="no", use_cpu=True, bf16=False, fp16=False, seed=0,
               dataloader_drop_last=False, **extra)


class _Recorder:
    """Keeps each training step's loss as computed (the logged one is rounded)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                   num_items_in_batch=num_items_in_batch)
        if model.training:
            loss = out[0] if isinstance(out, tuple) else out
            self.step_losses.append(float(loss.detach()))
        return out


def _trl_trajectory(trainer, model, lora: bool) -> Trajectory:
    trainer.step_losses = []
    trainer.train()
    norms = [float(r["grad_norm"]) for r in trainer.state.log_history if "grad_norm" in r]
    return Trajectory(trainer.step_losses, torch_weights(model, lora), norms)


def pair_ids(batch: dict) -> list[dict]:
    """Each pair of tpusft's pair rows as prompt, chosen and rejected token ids (the
    responses are exactly the trained tokens)."""
    out = []
    for inputs, segments, weights, sides in zip(batch["inputs"], batch["segment_ids"],
                                                batch["weights"], batch["sides"], strict=True):
        ids = {name: inputs[segments == s].tolist()
               for name, s in (("prompt_ids", 1), ("chosen_ids", 2), ("rejected_ids", 3))}
        for side, name in ((0, "chosen_ids"), (1, "rejected_ids")):
            assert np.sum(weights * (sides == side)) == len(ids[name])
        out.append(ids)
    return out


def trl_sft(model, tokenizer, batch: dict, hyper: Hyper, root: Path, lora: bool) -> Trajectory:
    """TRL's SFTTrainer on the batch's token ids, labels -100 outside the completions."""
    import datasets
    import trl

    rows = []
    for inputs, targets, weights, segments in zip(batch["inputs"], batch["targets"],
                                                  batch["weights"], batch["segment_ids"],
                                                  strict=True):
        n = int(np.count_nonzero(segments))
        ids = [int(inputs[0]), *targets[:n].tolist()]  # the sequence, its last token included
        trained = [False, *(weights[:n] > 0)]
        rows.append({"input_ids": ids,
                     "labels": [t if keep else -100 for t, keep in zip(ids, trained, strict=True)]})

    class Trainer(_Recorder, trl.SFTTrainer):
        pass

    args = _training_args(trl.SFTConfig, root, hyper, max_length=None,
                          packing=False, dataset_kwargs={"skip_prepare_dataset": True},
                          remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      processing_class=tokenizer)
    return _trl_trajectory(trainer, model, lora)


def trl_dpo(model, tokenizer, batch: dict, hyper: Hyper, root: Path, lora: bool,
            beta: float) -> Trajectory:
    """TRL's DPOTrainer (sigmoid loss) on the pairs' token ids; the reference is a copy of the
    starting model, or the model with its adapter disabled."""
    import datasets
    import trl

    class Trainer(_Recorder, trl.DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already token ids

    args = _training_args(trl.DPOConfig, root, hyper, beta=beta, loss_type=["sigmoid"],
                          max_length=None)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                      train_dataset=datasets.Dataset.from_list(pair_ids(batch)))
    return _trl_trajectory(trainer, model, lora)


def trl_simpo(model, tokenizer, batch: dict, hyper: Hyper, root: Path, lora: bool,
              beta: float, gamma: float) -> Trajectory:
    """TRL's CPOTrainer with loss_type=simpo and cpo_alpha=0 (SimPO) on the pairs' token
    ids."""
    import datasets
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    pairs = pair_ids(batch)

    class Trainer(_Recorder, CPOTrainer):
        def tokenize_row(self, feature, model=None):
            out = {"prompt_input_ids": feature["prompt_ids"],
                   "prompt_attention_mask": [1] * len(feature["prompt_ids"])}
            for side in ("chosen", "rejected"):
                ids = feature["prompt_ids"] + feature[f"{side}_ids"]
                out[f"{side}_input_ids"] = ids
                out[f"{side}_attention_mask"] = [1] * len(ids)
                out[f"{side}_labels"] = [-100] * len(feature["prompt_ids"]) + feature[
                    f"{side}_ids"]
            return out

    rows = [dict(p, prompt="", chosen="", rejected="") for p in pairs]
    args = _training_args(CPOConfig, root, hyper, beta=beta, loss_type="simpo",
                          simpo_gamma=gamma, cpo_alpha=0.0, max_length=4096,
                          remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, processing_class=tokenizer,
                      train_dataset=datasets.Dataset.from_list(rows))
    return _trl_trajectory(trainer, model, lora)


# ----------------------------------------------------------------------------- comparison
def compare(ours: Trajectory, ref: Trajectory, rtol: float = 1e-5,
            atol: float = 1e-5) -> tuple[float, float]:
    """(largest relative per-step loss difference, largest weight difference); asserts both
    within tolerance and that every reference tensor is in tpusft's export."""
    assert len(ours.losses) == len(ref.losses) == STEPS, (ours.losses, ref.losses)
    loss_rel = max(abs(a - b) / abs(b) for a, b in zip(ours.losses, ref.losses, strict=True))
    names = [n for n in ref.weights if n in ours.weights]
    missing = [n for n in ref.weights if n not in ours.weights and n != "lm_head.weight"]
    assert not missing, f"not in the export: {missing[:5]}"
    weight_diff = max(float(np.max(np.abs(ours.weights[n] - ref.weights[n]))) for n in names)
    detail = "\n".join(f"step {i + 1}: {a:.7f} vs {b:.7f}" for i, (a, b) in
                       enumerate(zip(ours.losses, ref.losses, strict=True)))
    assert loss_rel <= rtol, f"losses apart by {loss_rel:.2e} relative:\n{detail}"
    assert weight_diff <= atol, f"final weights apart by {weight_diff:.2e}"
    return loss_rel, weight_diff


def binding_clip(reference, hyper: Hyper) -> tuple[Hyper, Trajectory]:
    """`hyper` with a clipping threshold halfway between the first and the last gradient norm
    of an unclipped reference run, and the reference run with it: clipping then scales some
    steps and leaves others alone, so a wrong norm shows in the trajectory (a threshold
    that binds on every step would scale Adam's inputs by similar factors, which Adam
    mostly normalises away). `reference(hyper) -> Trajectory`."""
    import dataclasses

    free = reference(dataclasses.replace(hyper, clip=1e9)).grad_norms
    hyper = dataclasses.replace(hyper, clip=round(0.5 * (free[0] + free[-1]), 6))
    ref = reference(hyper)
    bound = [n > hyper.clip for n in ref.grad_norms]
    assert any(bound) and not all(bound) and all(map(math.isfinite, ref.grad_norms)), (
        f"clipping at {hyper.clip} should bind on some steps only: norms {ref.grad_norms}")
    return hyper, ref
