"""Compile-only runs for TPU topologies (aot/): the run's own step compiled by libtpu's TPU
compiler on this CPU machine, its per-chip memory and the fit verdict.

Figures here are the TPU compiler's for the program; nothing runs on a TPU."""

import importlib.util
import re

import jax
import numpy as np
import pytest
from conftest import REPO, run_in_process

from tpusft import train_dpo, train_grpo, train_sft
from tpusft.aot import compile_step, fit, topology
from tpusft.errors import ConfigError
from tpusft.methods import preference as preference_method
from tpusft.methods import sft

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu (the test extra's jax[tpu]) is not installed")
DEMO = str(REPO / "configs/demo/sft.yml")
DPO = str(REPO / "configs/demo/dpo.yml")


def test_cloud_names_map_to_libtpu_topologies():
    v5p = topology.parse("v5p-8")
    assert (v5p.chips, v5p.libtpu_topology, v5p.devices_per_slice) == (4, "v5:2x2x1", 4)
    assert topology.parse("v6e-8").libtpu_topology == "v6e:2x4"
    assert topology.parse("V5E-1").libtpu_topology == "v5e:1x1"
    assert topology.parse("v4-16").libtpu_topology == "v4:2x2x2"
    ironwood = topology.parse("tpu7x-8")  # 4 chips, each two devices
    assert (ironwood.libtpu_topology, ironwood.devices_per_slice) == ("tpu7x:2x2x1", 8)
    assert topology.parse("v5e-8").hbm_bytes_per_device == 16 * 2**30
    for bad in ("v5p-6", "v5e-3", "h100-8", "v5p"):
        with pytest.raises(ConfigError, match="not a known TPU topology; known: v4-8, "):
            topology.parse(bad)


def test_unknown_topology_is_a_one_line_error_with_exit_2():
    done = run_in_process(train_sft.main, DEMO, "compile_topology=v5p-9")
    assert done.returncode == 2
    assert done.stderr.startswith("error: compile_topology='v5p-9' is not a known TPU "
                                  "topology; known: ") and "v5p-8" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_batch_shapes_are_the_pipelines(demo_tokenizer, demo_assets):
    """What a compile-only run compiles for is what the data pipeline and the feeder hand
    the trainer (keys, dtypes, shapes)."""
    from tpusft.config import load_config
    from tpusft.data import packing
    from tpusft.training import loss
    from tpusft.training.setup import train_and_eval_data

    cfg = load_config([DEMO, f"base_output_directory={demo_assets.parent}",
                       f"tokenizer_path={demo_assets / 'tokenizer'}", "hf_path=json",
                       f"hf_data_files={demo_assets / 'train.jsonl'}", "hf_eval_files="])
    train_ds, _, _ = train_and_eval_data(cfg, demo_tokenizer, packing.build_dataset)
    batch = loss.add_loss_denominators([next(iter(train_ds))])[0]
    spec = loss.sft_batch_shapes(cfg.global_batch_size, cfg.max_target_length)
    assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in batch.items()} == {
        k: (shape, np.dtype(dtype)) for k, (shape, dtype) in spec.items()}


def test_compile_path_lowers_the_program_tunix_runs(demo_assets):
    """On this machine's 8 CPU devices: the shapes-only trainer and its step lower to the very
    program the trainer of a real run jits (Tunix's jit_train_and_eval_step, over concrete
    weights), for a full and a LoRA fine-tune."""
    from tpusft.config import load_config
    from tpusft.models.decoder import ModelArgs
    from tpusft.models.sharding import mesh_of
    from tpusft.training import loss
    from tpusft.training.optimizer import make_optimizer
    from tpusft.training.setup import build_model
    from tpusft.training.trainer import sft_trainer

    for extra in ([], ["lora.enable_lora=true", "lora.rank=4"]):
        cfg = load_config([DEMO, "tokenizer_path=unused", "hf_path=json",
                           "hf_data_files=unused.jsonl", *extra])
        mesh = mesh_of(cfg)
        rows = cfg.global_batch_size
        shapes = loss.sft_batch_shapes(rows, cfg.max_target_length)
        trainer, model, optimizer, _ = compile_step.abstract_trainer(
            cfg, mesh, sft.method().make_trainer)
        ours = compile_step.tunix_train_step_jit(trainer).lower(
            model, optimizer, compile_step.abstract_batch(shapes, mesh))

        with mesh:
            real = sft_trainer(build_model(cfg, ModelArgs.from_config(cfg), mesh, False,
                                           print_fn=lambda *_: None), make_optimizer(cfg), cfg)
            jitted, _ = real.jit_train_and_eval_step()
            batch = jax.device_put(
                {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()},
                {k: s.sharding for k, s in compile_step.abstract_batch(shapes, mesh).items()})
            theirs = jitted.func.lower(real.model, real.optimizer, batch)
        assert ours.as_text(debug_info=False) == theirs.as_text(debug_info=False), extra


def test_dpo_compile_path_lowers_the_programs_tunix_runs():
    """DPO: the policy's step and the reference's log-prob program of the shapes-only
    trainer are the programs a real run's trainer jits, full (a copy of the weights as the
    reference) and LoRA (the base shared, the starting adapters copied)."""
    from tpusft.config import load_config
    from tpusft.models.sharding import mesh_of
    from tpusft.training import preference
    from tpusft.training.optimizer import make_optimizer
    from tpusft.training.setup import build_model, reference_model

    method = preference_method.method()
    for extra in ([], ["lora.enable_lora=true", "lora.rank=4"]):
        # The real trainer starts from random weights: the demo's SFT checkpoint need not
        # exist for the programs to be compared.
        cfg = load_config([DPO, "tokenizer_path=unused", "hf_path=json",
                           "hf_data_files=unused.jsonl", "load_parameters_path=", *extra])
        mesh = mesh_of(cfg)
        shapes = method.batch_shapes(cfg, cfg.global_batch_size)
        trainer, model, optimizer, ref = compile_step.abstract_trainer(
            cfg, mesh, method.make_trainer, method.model_args(cfg))
        batch = compile_step.abstract_batch(shapes, mesh)
        pairs = {k: v for k, v in batch.items() if k != "ref_logps"}
        with mesh:
            ours = (compile_step.tunix_train_step_jit(trainer).lower(model, optimizer, batch),
                    trainer.reference_logps.lower(ref, pairs))
            policy = build_model(cfg, method.model_args(cfg), mesh, False,
                                 print_fn=lambda *_: None)
            real = preference.preference_trainer(policy, reference_model(policy),
                                                 make_optimizer(cfg), cfg)
            jitted, _ = real.jit_train_and_eval_step()
            concrete = jax.device_put(
                {k: np.zeros(shape, dtype) for k, (shape, dtype) in shapes.items()},
                {k: s.sharding for k, s in batch.items()})
            theirs = (jitted.func.lower(real.model, real.optimizer, concrete),
                      real.reference_logps.lower(
                          real.ref_model, {k: v for k, v in concrete.items()
                                           if k != "ref_logps"}))
        for a, b in zip(ours, theirs, strict=True):
            assert a.as_text(debug_info=False) == b.as_text(debug_info=False), extra


GRPO = str(REPO / "configs/demo/grpo.yml")


def _recording(fn, calls, name):
    """`fn`, recording each call's arguments under `name` (the first call's)."""
    def wrapper(*args, **kwargs):
        calls.setdefault(name, (args, kwargs))
        return fn(*args, **kwargs)
    wrapper.lower = fn.lower
    return wrapper


def test_grpo_compile_path_lowers_the_programs_a_cluster_runs(demo_assets, demo_tokenizer,
                                                              monkeypatch):
    """GRPO: each program the compile path builds from shapes (the rollout's prefill and
    decode, the reference's log-probs, the update) lowers to the program a real RLCluster
    and learner run, lowered with the very arguments the real calls received, full and LoRA."""
    from tunix.rl import common
    from tunix.rl import rl_cluster as rl_cluster_lib

    from tpusft.aot import grpo_programs
    from tpusft.config import load_config
    from tpusft.models.decoder import ModelArgs
    from tpusft.models.sharding import BATCH_AXES, mesh_of
    from tpusft.rl import grpo
    from tpusft.rl import rewards as rewards_lib
    from tpusft.training.setup import build_model

    for extra in ([], ["lora.enable_lora=true", "lora.rank=4"]):
        cfg = load_config([GRPO, f"base_output_directory={demo_assets.parent}",
                           f"tokenizer_path={demo_assets / 'tokenizer'}", "hf_path=json",
                           "hf_data_files=unused.jsonl", "load_parameters_path=",
                           "global_batch_size=8", "grpo.num_generations=2",
                           "grpo.max_prompt_length=16",
                           "grpo.max_completion_length=4", "enable_checkpointing=false", *extra])
        mesh = mesh_of(cfg)
        n = grpo_programs.rows(cfg)
        tokenizer, pad_id, eos_id = grpo_programs.tokens(cfg)

        def make(model, optimizer, c):
            from tpusft.training.setup import reference_model
            return (grpo_programs.actor_trainer(model, optimizer, c, pad_id, eos_id),
                    reference_model(model))

        trainer, model, optimizer, reference = compile_step.abstract_trainer(cfg, mesh, make)
        with mesh:
            s = grpo_programs.sampler(model, tokenizer, cfg)
            prefill, state = grpo_programs.prefill_program(s, cfg, n)
            decode, _ = grpo_programs.decode_program(s, prefill, prefill.compile(), state)
            ours = {"prefill": prefill, "decode": decode,
                    "reference": grpo_programs.logps_program(
                        reference, cfg, n, pad_id, eos_id, cfg.grpo.temperature, True),
                    "update": compile_step.tunix_train_step_jit(trainer).lower(
                        model, optimizer, grpo_programs.train_example(
                            cfg, n, jax.sharding.NamedSharding(
                                mesh, jax.sharding.PartitionSpec(BATCH_AXES))))}

            calls = {}
            actor = build_model(cfg, ModelArgs.from_config(cfg), mesh, False,
                                print_fn=lambda *_: None)
            cluster = grpo.build_cluster(actor, demo_tokenizer, mesh, cfg)
            rewards = rewards_lib.build(["answer_correct"], [], tokenizer=demo_tokenizer,
                                        format_pattern="", length_penalty_start=1,
                                        max_completion_length=cfg.grpo.max_completion_length)
            grpo.build_learner(cluster, cfg, rewards)
            real = cluster.rollout._sampler
            for attr, name in (("_compiled_prefill_fn", "prefill"),
                               ("_compiled_decode_fn", "decode")):
                monkeypatch.setattr(real, attr, _recording(getattr(real, attr), calls, name))
            monkeypatch.setattr(common, "compute_per_token_logps", _recording(
                common.compute_per_token_logps, calls, "reference"))
            prompts = ["<|begin_of_text|>what is 1+2?"] * n
            out = cluster.generate(prompts=prompts, mode=rl_cluster_lib.Mode.TRAIN)
            prompt_ids = jax.numpy.array(out.left_padded_prompt_tokens)
            completion = jax.numpy.full((n, cfg.grpo.max_completion_length), pad_id,
                                        jax.numpy.int32)
            cluster.get_ref_per_token_logps(prompt_ids, completion, pad_id, eos_id)
            monkeypatch.undo()
            theirs = {}
            for name, fn in (("prefill", real._compiled_prefill_fn),
                             ("decode", real._compiled_decode_fn),
                             ("reference", common.compute_per_token_logps)):
                args, kwargs = calls[name]
                theirs[name] = fn.lower(*args, **kwargs)
            jitted, _ = cluster.actor_trainer.jit_train_and_eval_step()
            example = jax.tree.map(
                lambda x: jax.device_put(np.zeros(x.shape, x.dtype), x.sharding),
                grpo_programs.train_example(cfg, n, jax.sharding.NamedSharding(
                    mesh, jax.sharding.PartitionSpec(BATCH_AXES))))
            theirs["update"] = jitted.func.lower(cluster.actor_trainer.model,
                                                 cluster.actor_trainer.optimizer, example)
        for name in ours:
            assert (ours[name].as_text(debug_info=False)
                    == theirs[name].as_text(debug_info=False)), (name, extra)


@needs_libtpu
def test_grpo_compiles_for_v5e_8_with_every_program():
    """A compile-only GRPO run reports the resident state and each program's figures."""
    done = run_in_process(train_grpo.main, GRPO, "compile_topology=v5e-8",
                          "load_parameters_path=")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for program in ("rollout prefill (KV cache", "rollout decode:", "reference log-probs:",
                    "update:"):
        assert any(line.startswith(f"  {program}") for line in lines), (program, done.stdout)
    assert re.search(r"^per chip: parameters .*, resident through the step$", done.stdout,
                     re.M), done.stdout
    assert "fits:" in done.stdout


@needs_libtpu
def test_dpo_full_lora_and_simpo_compile_for_v5e_8():
    """The reference's own weights count in the total (a full copy, or the adapters of a
    LoRA run); SimPO has none. With a reference, remat none runs as minimal, as in a run."""
    for extra, expect in (([], "remat minimal"), (["lora.enable_lora=true"], "remat minimal"),
                          (["dpo.loss_type=simpo"], "remat none")):
        done = run_in_process(train_dpo.main, DPO, "compile_topology=v5e-8", *extra)
        assert done.returncode == 0, (extra, done.stderr[-2000:])
        out = done.stdout
        assert "fits:" in out and expect in out, out
        assert ("reference weights" in out) == (expect == "remat minimal"), out


@needs_libtpu
@pytest.mark.slow
def test_a_1b_model_s_dpo_and_grpo_steps_compile_for_v5e_8_and_fit():
    """Llama 3.2 1B's shapes through the demo's DPO and GRPO configs (their batches and
    lengths): every program of each step compiles for a v5e-8 and fits."""
    for main, config in ((train_dpo.main, DPO), (train_grpo.main, GRPO)):
        done = run_in_process(main, config, "model_name=llama3.2-1b", "load_parameters_path=",
                              "compile_topology=v5e-8")
        assert done.returncode == 0, (config, done.stdout[-2000:], done.stderr[-2000:])
        assert "llama3.2-1b (1,235.8M parameters)" in done.stdout, done.stdout
        assert re.search(r"^fits: [\d.]+ GiB to spare per chip$", done.stdout, re.M), done.stdout


@needs_libtpu
@pytest.mark.slow
def test_a_1b_model_s_qlora_step_compiles_for_v5e_8_and_holds_less_than_lora():
    """Llama 3.2 1B's QLoRA nf4 step at LoRA rank 16 compiles for a v5e-8 (with uint4 kernels
    in the layer scan the TPU compiler rejected its backward with a cycle error), and holds
    less than LoRA's on its bfloat16-computed float32 base (Qwix's nf4 gather held 4.7 GiB of
    temporaries a chip)."""
    totals = {}
    for name, qtype in (("qlora", "lora.weight_qtype=nf4"), ("lora", "lora.weight_qtype=")):
        done = run_in_process(train_sft.main, DEMO, "model_name=llama3.2-1b",
                              "load_parameters_path=", "max_target_length=256",
                              "global_batch_size=8", "lora.enable_lora=true", "lora.rank=16",
                              qtype, "compile_topology=v5e-8")
        assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
        totals[name] = float(re.search(r"peak total ([\d.]+) GiB", done.stdout).group(1))
    assert totals["qlora"] < totals["lora"], totals


def test_a_compiler_error_other_than_memory_is_one_line_run_failure():
    """A program the TPU compiler rejects for another reason than memory is a RunFailed
    (one line, exit 1) naming the compiler's message, not a traceback."""
    from tpusft.errors import RunFailed

    class Rejected:
        def compile(self):
            raise jax.errors.JaxRuntimeError(
                "FAILED_PRECONDITION: A cycle is detected while visiting instruction\nmore")

    with pytest.raises(RunFailed, match=r"^the TPU compiler rejected the step, which says "
                       r"nothing of its memory: FAILED_PRECONDITION: A cycle is detected "
                       r"while visiting instruction$"):
        compile_step.compile_lowered(Rejected(), 0, 0)


@needs_libtpu
def test_demo_compiles_for_v5e_8_and_fits():
    done = run_in_process(train_sft.main, DEMO, "compile_topology=v5e-8")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "compiled for v5e-8 (8 x TPU v5 lite, 16.00 GiB HBM each)" in out
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}; batch 32 x 128 tokens (4 per device)" in out
    assert "not a run on a TPU" in out and "fits: 15.9" in out


@needs_libtpu
def test_lora_qlora_and_tensor_parallel_compile_for_v5e_8():
    for extra in (["lora.enable_lora=true"], ["lora.enable_lora=true", "lora.weight_qtype=nf4"],
                  ["ici_tensor_parallelism=2"]):
        done = run_in_process(train_sft.main, DEMO, "compile_topology=v5e-8", *extra)
        assert done.returncode == 0, (extra, done.stderr[-2000:])
        assert "fits:" in done.stdout, extra


@needs_libtpu
def test_a_step_that_cannot_fit_exits_1_with_what_does():
    """A 1B-shaped full fine-tune on one v5e chip (fp32 weights and Adam moments alone are
    13.8 GiB): the compiler's out-of-memory figures, no smaller batch that fits, and LoRA as
    the change that does, each found by compiling."""
    done = run_in_process(train_sft.main, DEMO, "model_name=llama3.2-1b", "remat_policy=full",
                          "compile_topology=v5e-1", "global_batch_size=2",
                          "max_target_length=1024")
    assert done.returncode == 1, done.stderr[-2000:]
    out = done.stdout
    assert "per chip: parameters 4.60 GiB, optimizer state 9.21 GiB; out of memory: the " \
           "compiler needs " in out
    assert re.search(r"^does not fit by [\d.]+ GiB per chip$", out, re.M), out
    assert "largest per-device batch that fits: none, not even 1 row of 1024 tokens" in out
    assert re.search(r"^cheapest change that fits at this batch: lora.enable_lora=true "
                     r"\(total [\d.]+ GiB of 16.00 GiB\)$", out, re.M), out


QWEN_0_6B = [DEMO, "model_name=qwen3-0.6b", "compile_topology=v5e-8", "max_target_length=1024",
             "global_batch_size=8", "remat_policy=full"]


SHARES_QWEN = pytest.mark.xdist_group("aot-qwen")  # one worker compiles it, once


@pytest.fixture(scope="module")
def qwen_auto():
    """Qwen3 0.6B's step with attention=auto compiled for a v5e-8 once, for the two tests
    that read it: (the compiler's result, the executable's HLO text)."""
    from tpusft.config import load_config

    cfg = load_config([*QWEN_0_6B, "attention=auto"])
    result, _ = fit.compile_run(cfg, sft.method(), topology.parse("v5e-8"))
    assert result.fits, result.error
    return result, result.executable.as_text()


@needs_libtpu
@SHARES_QWEN
def test_on_tpu_auto_attention_is_splash_and_holds_less_than_xla(qwen_auto):
    """attention=auto picks splash for a TPU topology (head_dim 128, T 1024): its kernel is in
    the compiled step, which holds less per chip than the same step with XLA's attention."""
    result, text = qwen_auto
    assert "tpu_custom_call" in text
    done = run_in_process(train_sft.main, *QWEN_0_6B, "attention=xla")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[0].endswith("attention xla"), done.stdout
    xla = float(re.search(r"total ([\d.]+) GiB", done.stdout).group(1))
    assert result.total / 2**30 < xla - 0.005, (result.total / 2**30, xla)


@needs_libtpu
def test_on_tpu_auto_attention_is_named_splash():
    """The compile-only run's header names the kernel attention=auto resolves to."""
    from tpusft.config import load_config
    from tpusft.methods.sft import method
    from tpusft.training import report

    cfg = load_config([*QWEN_0_6B, "attention=auto"])
    mesh = fit.mesh_for(cfg, topology.parse("v5e-8"))
    assert report.attention(cfg, method().model_args(cfg), mesh) == "splash"


@needs_libtpu
@SHARES_QWEN
def test_the_step_keeps_no_whole_output_layer_gradient_and_no_branch(qwen_auto):
    """The compiled step never all-reduces the output layer's [embed, vocab] gradient whole
    onto every chip (it is computed split over the vocabulary, or reduce-scattered), and the
    optimizer drops a non-finite update by a select, not a conditional that would hold a
    second copy of the update tree (Qwen3 0.6B, 1,024 x 151,936 output layer, on a v5e-8)."""
    _, text = qwen_auto
    whole = [line for line in text.splitlines() if " all-reduce(" in line
             and re.search(r"\[(1024,151936|151936,1024)\]", line.split("all-reduce(")[0])]
    assert not whole, whole[0][:300]
    assert " conditional(" not in text
