"""Will it fit? A compile-only run: the run's step compiled for a TPU topology, its per-chip
memory against the chip's HBM, and when it does not fit, what does.

These are the TPU compiler's figures for the program, not measurements on a TPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tpusft.aot import compile_step
from tpusft.aot.compile_step import GIB, Compiled
from tpusft.aot.topology import Topology, parse
from tpusft.methods import Method
from tpusft.models.sharding import batch_shards


def describe(cfg: Any) -> str:
    if cfg.lora.enable_lora:
        kind = f"QLoRA {cfg.lora.weight_qtype}" if cfg.lora.weight_qtype else "LoRA"
        return f"{kind} rank {cfg.lora.rank}"
    return "full"


def mesh_for(cfg: Any, topology: Topology):
    from tpusft.models.sharding import mesh_of

    return mesh_of(cfg, topology.devices())


def compile_run(cfg: Any, method: Method, topology: Topology) -> tuple[Compiled, Any]:
    """(what the compiler said, the mesh) for `cfg`'s step on `topology`. With a reference
    model (DPO), its log-prob program is compiled too (a run executes it before each step)
    and its own weights count in the step's total; the first program that does not fit is
    the result."""
    from flax import nnx

    from tpusft.training.setup import check_batch

    mesh = mesh_for(cfg, topology)
    check_batch(cfg, mesh)
    if method.programs is not None:
        return method.programs(cfg, mesh), mesh
    trainer, model, optimizer, reference = compile_step.abstract_trainer(
        cfg, mesh, method.make_trainer, method.model_args(cfg))
    rows = cfg.global_batch_size // cfg.gradient_accumulation_steps
    batch = compile_step.abstract_batch(method.batch_shapes(cfg, rows), mesh)
    if reference is not None:
        # setup.reference_model: a LoRA model's reference shares its base arrays and owns
        # a copy of the adapters; a full model's owns a copy of every weight.
        own = compile_step.per_device_bytes(
            nnx.state(reference, nnx.LoRAParam) if cfg.lora.enable_lora
            else nnx.state(reference))
        with mesh:
            ref = compile_step.compile_lowered(
                trainer.reference_logps.lower(
                    reference, {k: v for k, v in batch.items() if k != "ref_logps"}),
                compile_step.per_device_bytes(nnx.state(reference)), 0)
        if not ref.fits:
            ref.error = f"the reference's log-prob program: {ref.error}"
            ref.params = compile_step.per_device_bytes(nnx.state(model))
            ref.optimizer = compile_step.per_device_bytes(
                nnx.state(optimizer, nnx.optimizer.OptState))
            return ref, mesh
    step = compile_step.compile_train_step(trainer, model, optimizer, batch, mesh)
    if reference is not None:
        step.reference = own
        step.seconds += ref.seconds
    return step, mesh


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def memory_line(c: Compiled, hbm: float) -> str:
    head = f"parameters {gib(c.params)}, optimizer state {gib(c.optimizer)}"
    if c.reference:
        head += f", reference weights {gib(c.reference)}"
    if c.fits:
        return (f"{head}, peak total {gib(c.total)} of {gib(hbm)} HBM (temporaries "
                f"{gib(c.temporaries)})")
    if c.needed:
        return (f"{head}; out of memory: the compiler needs {gib(c.needed)} of the "
                f"{gib(c.available)} it can use")
    return f"{head}; {c.error}"


def program_lines(c: Compiled, hbm: float) -> list[str]:
    """A step of several programs: what stays resident, then each program's own figures."""
    head = f"parameters {gib(c.params)}, optimizer state {gib(c.optimizer)}"
    reference = max(p.reference for p in c.parts.values())
    if reference:
        head += f", reference weights {gib(reference)}"
    lines = [f"per chip: {head}, resident through the step"]
    for name, p in c.parts.items():
        extra = f" (KV cache {gib(c.kv_cache)})" if name == "rollout prefill" else ""
        if p.fits:
            lines.append(f"  {name}{extra}: peak total {gib(p.total)} of {gib(hbm)} HBM "
                         f"(temporaries {gib(p.temporaries)})")
        elif p.needed:
            lines.append(f"  {name}: out of memory: the compiler needs {gib(p.needed)} of the "
                         f"{gib(p.available)} it can use")
        else:
            lines.append(f"  {name}: {p.error}")
    return lines


def shortfall(c: Compiled, hbm: float) -> float:
    """Bytes over the chip: from the compiler's message, else the total over the HBM."""
    if c.needed:
        return c.needed - c.available
    return max(c.total - hbm, 0.0)


def run(argv: Sequence[str], cfg: Any, method: Method, print_fn=print) -> int:
    """The compile-only run: prints the report; 0 fits, 1 does not."""
    from tpusft.training import report
    from tpusft.training.metrics import training_flops_per_token

    topology = parse(cfg.compile_topology, cfg.compile_topology_num_slices)
    hbm = topology.hbm_bytes_per_device
    args = method.model_args(cfg)
    result, mesh = compile_run(cfg, method, topology)
    accumulation = cfg.gradient_accumulation_steps
    rows = cfg.global_batch_size * method.rows_per_example(cfg) // accumulation
    per_device = rows // batch_shards(mesh)
    kind = mesh.devices.flat[0].device_kind
    slices = f" x {topology.num_slices} slices" if topology.num_slices > 1 else ""
    print_fn(f"tpusft {method.title(cfg)} compile-only | {cfg.model_name} "
             f"({args.num_params() / 1e6:,.1f}M parameters), {describe(cfg)}, remat "
             f"{args.remat_policy}, attention {report.attention(cfg, args, mesh, method.dense)}")
    micro = f", {accumulation} micro-batches" if accumulation > 1 else ""
    print_fn(f"compiled for {topology.name}{slices} ({len(mesh.devices.flat)} x {kind}, "
             f"{gib(hbm)} HBM each), mesh {dict(mesh.shape)}; "
             f"{method.batch_line(cfg, rows, per_device, micro)}")
    flops = training_flops_per_token(args, method.length(cfg)) * (
        cfg.global_batch_size * method.rows_per_example(cfg) * method.length(cfg)
    ) * method.flops_factor(cfg)
    if result.parts:
        for line in program_lines(result, hbm):
            print_fn(line)
    else:
        print_fn(f"per chip: {memory_line(result, hbm)}")
    print_fn(f"model FLOPs per step {flops:.3g}; compiled in "
             f"{sum(p.seconds for p in result.parts.values()) or result.seconds:.1f} s")
    print_fn("(the TPU compiler's figures for this program, not a run on a TPU)")
    if result.fits:
        print_fn(f"fits: {gib(hbm - result.total)} to spare per chip" if result.total <= hbm
                 else "fits: the compiler placed the step in HBM (the total above counts some "
                      "buffers that are never live at once)")
        return 0
    print_fn(f"does not fit by {gib(shortfall(result, hbm))} per chip")
    for line in what_fits(argv, cfg, method, topology, per_device):
        print_fn(line)
    return 1


def _with(argv: Sequence[str], changes: Sequence[str]) -> Any:
    from tpusft.config import load_config

    return load_config([*argv, *changes])


def largest_batch(argv: Sequence[str], method: Method, topology: Topology,
                  ways: int, per_device: int, per_example: int = 1) -> int:
    """The largest per-device batch below `per_device` rows (halving) whose step fits; 0:
    none. A GRPO example is `per_example` rows (its completions)."""
    rows = per_device // 2
    while rows >= 1:
        if rows * ways % per_example == 0:
            cfg = _with(argv, [f"global_batch_size={rows * ways // per_example}",
                               "gradient_accumulation_steps=1"])
            if compile_run(cfg, method, topology)[0].fits:
                return rows
        rows //= 2
    return 0


def candidate_changes(cfg: Any) -> list[list[str]]:
    """Changes to try, the ones that keep the training the same first: full recomputation,
    FSDP over every chip, then adapters and a quantized base."""
    changes = []
    if cfg.remat_policy != "full":
        changes.append(["remat_policy=full"])
    if (cfg.ici_fsdp_parallelism, cfg.ici_data_parallelism, cfg.ici_tensor_parallelism) != (
            -1, 1, 1):
        changes.append(["ici_fsdp_parallelism=-1", "ici_data_parallelism=1",
                        "ici_tensor_parallelism=1"])
    if not cfg.lora.enable_lora:
        changes.append(["lora.enable_lora=true"])
    if not cfg.lora.weight_qtype:
        changes.append(["lora.enable_lora=true", "lora.weight_qtype=nf4"])
    return changes


def what_fits(argv: Sequence[str], cfg: Any, method: Method, topology: Topology,
              per_device: int) -> list[str]:
    """Lines saying what fits instead, each found by compiling."""
    hbm = topology.hbm_bytes_per_device
    mesh = mesh_for(cfg, topology)
    ways = batch_shards(mesh)
    lines = []
    per_example = method.rows_per_example(cfg)
    rows = largest_batch(argv, method, topology, ways, per_device, per_example)
    if rows and method.programs is not None:
        lines.append(f"largest per-device batch that fits: {rows} rows (global_batch_size="
                     f"{rows * ways // per_example} prompts)")
    elif rows:
        steps = cfg.global_batch_size // (rows * ways)
        lines.append(f"largest per-device batch that fits: {rows} (keep global_batch_size="
                     f"{cfg.global_batch_size} with gradient_accumulation_steps={steps})")
    else:
        lines.append("largest per-device batch that fits: none, not even 1 row of "
                     f"{method.length(cfg)} tokens")
    for change in candidate_changes(cfg):
        other = _with(argv, change)
        result = compile_run(other, method, topology)[0]
        if result.fits:
            lines.append(f"cheapest change that fits at this batch: {' '.join(change)} "
                         f"(total {gib(result.total)} of {gib(hbm)})")
            break
    else:
        lines.append("no single change among remat_policy=full, FSDP over every chip, LoRA "
                     "and QLoRA nf4 fits at this batch")
    return lines
