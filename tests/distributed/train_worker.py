"""Run by ``torchrun --nproc_per_node 2``: train the bundled example under one engine, step by step
against a single-process reference.

    torchrun --nproc_per_node 2 tests/distributed/train_worker.py --engine ENGINE [--optimizer sgd|adamw]
        [--local-accumulation] [--offload] [--no-attach] [--break-seed] [--init full|zero|meta]

ENGINE: ``ddp`` (``stsc.integrations.ddp.attach``, no ``find_unused_parameters``), ``ddp-find-unused``,
``fsdp2`` (``fully_shard`` per decoder block, then the model), ``zero2``, ``zero3`` (DeepSpeed, with
``stsc.integrations.deepspeed.attach``; ``--offload``: optimizer offloaded to the CPU), and
``hf-zero3``: ``examples/hf_trainer.py`` with ``--deepspeed`` (ZeRO-3: the model built under ``zero.Init``), whose
``StscCallback`` attaches the integration; rank 0 prints where the stages were checked, the losses, the stages, how
many decoder blocks each training forward ran, and ``RESULT ok engine=hf-zero3 ...`` (no reference: the Trainer's
data order is its own).

Six optimizer steps of two micro-batches each (gradient accumulation 2; DDP and FSDP2 reduce after
each, or with ``--local-accumulation`` keep the first one's gradients local: ``no_sync()``,
``set_requires_gradient_sync(False)``) through the policy
``POLICY``: steps 0-1 compress visual tokens (``random``: rank-identical draws), steps 2-5 skip the
decoder blocks ``PATTERNS`` gives per micro-batch (a block skipped in every micro-batch of a step, in
one and run in the other, in none). Gradients are clipped to norm 1. Each rank trains on its own
batches; rank 0 also trains a plain copy of the model in one process on both ranks' batches (each
micro-batch's loss divided by ranks x micro-batches, the engines' averaging). After every optimizer
step every rank's full parameters must equal each other exactly and the reference to ``TOLERANCE``
(SGD with momentum and weight decay; AdamW with eps 1e-5, since with 1e-8 a gradient within float
rounding of zero turns reduction-order rounding into update differences of 1e-6 to 1e-5).
Rank 0 prints one line per step and ``RESULT ok ...`` at the end; the first disagreement prints
``MISMATCH step N: ...`` and exits 1.

DeepSpeed's ZeRO optimizer steps a flat partition with one AdamW step count, so there the reference
counts every optimizer step for every parameter (see docs/training.md, "DeepSpeed ZeRO-2 and ZeRO-3"); everything else is plain PyTorch.
``--no-attach`` leaves out the engine's stsc integration (DDP and DeepSpeed refuse to train then);
``--break-seed`` gives rank 1 another policy seed, which the reference check must catch.

``--init``: how the trained model is built. ``full`` (default): whole on every rank. ``zero`` (``zero3``): under
``deepspeed.zero.Init`` with the engine's config, each rank holding only its partition of every parameter, the
reference's weights loaded into it as ``from_pretrained`` does (``GatheredParameters``, rank 0 writing); ``meta``
(``fsdp2``): on the meta device, then after ``fully_shard`` materialized (``to_empty``) and the reference's weights
loaded (``benchmarks/distributed.py``'s ``materialize``).
Either way ``sparsify`` sees a model whose weights hold no data, and binds its passes at the first training forward.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import tiny_llava  # noqa: E402
from distributed import materialize  # noqa: E402

import stsc  # noqa: E402
from stsc.policy import parse_policy  # noqa: E402

POLICY = """
version: 1
seed: {seed}
stages:
  - {{name: alignment, steps: 2, passes: {{compress_visual_tokens: {{method: random, keep_ratio: 0.5}}}}}}
  - {{name: instruction, steps: 4, passes: {{skip_layers: {{schedule: constant, alpha: 0.5, eps: 0.5}}}}}}
"""
PATTERNS = {2: [[1, 2], [1, 2]], 3: [[3], [0]], 4: [[], [1, 3]], 5: [[0, 1, 2], [0, 1, 2]]}  # step -> per micro-batch
STEPS, MICRO_BATCHES, CLIP, TOLERANCE = 6, 2, 1.0, 1e-6
DEEPSPEED = ("zero2", "zero3", "hf-zero3")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", required=True, choices=["ddp", "ddp-find-unused", "fsdp2", *DEEPSPEED])
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument("--local-accumulation", action="store_true")
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--no-attach", action="store_true")
    parser.add_argument("--break-seed", action="store_true")
    parser.add_argument("--init", default="full", choices=["full", "zero", "meta"])
    args = parser.parse_args()
    engine = {"zero": "zero3", "meta": "fsdp2"}.get(args.init)
    if engine and args.engine != engine:
        parser.error(f"--init {args.init} is for --engine {engine}")
    faulthandler.dump_traceback_later(100, exit=True)  # a hung rank prints where it hangs, and exits
    init_process_group(args.engine)
    if args.engine == "hf-zero3":
        hf_trainer_zero3()
        leave(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    full = tiny_llava.build_model()
    reference = Reference(full, args.optimizer, shared_step_count=args.engine in DEEPSPEED) if rank == 0 else None
    model = build(args, full)
    seed = 1 if args.break_seed and rank == 1 else 0
    with counting_collectives() as collectives:
        sparse = stsc.sparsify(model, parse_policy(POLICY.format(seed=seed)), batch(model, 0, 0, rank))
    if rank == 0:
        print(f"sparsify: checked_on={sparse.report.checked_on!r} collectives={len(collectives)}", flush=True)
    trained, step_fn = wrap(args, sparse, full)
    for step in range(STEPS):
        losses = []
        for micro in range(MICRO_BATCHES):
            sparse.set_progress(step=step)
            force(sparse, step, micro)
            losses.append(step_fn(trained, batch(model, step, micro, rank), last=micro == MICRO_BATCHES - 1))
        if reference is not None:
            reference.step(step, world)
        check(args.engine, step, sparse, reference, losses)
    if rank == 0:
        print(f"RESULT ok engine={args.engine} optimizer={args.optimizer} offload={args.offload} steps={STEPS} "
              f"max_diff={reference.max_diff:.3g}", flush=True)
    leave(0)


def init_process_group(engine: str) -> None:
    timeout = datetime.timedelta(seconds=60)
    if engine not in DEEPSPEED:
        dist.init_process_group("gloo", timeout=timeout)
        return
    import deepspeed

    # DeepSpeed's CPU accelerator compiles a shared-memory all-reduce op at its first init (minutes of g++);
    # gloo does the communication here, so mark that op unavailable (its documented, cached compatibility table)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", timeout=timeout)


def build(args, full):
    """The model to train (see ``--init``): ``full`` itself, or the same model built under zero.Init / on meta."""
    if args.init == "full":
        return full
    if args.init == "meta":
        with torch.device("meta"):
            return tiny_llava.build_model()
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(args)):
        model = tiny_llava.build_model()
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
        if dist.get_rank() == 0:
            model.load_state_dict(full.state_dict())
    return model


@contextlib.contextmanager
def counting_collectives():
    """Within the block, the names of the collectives this rank calls (torch.distributed's, and DeepSpeed's comm
    functions, through which ZeRO-3 gathers a partitioned parameter)."""
    modules = [dist]
    if "deepspeed" in sys.modules:
        import deepspeed.comm

        modules.append(deepspeed.comm)
    names = ["all_gather", "all_gather_into_tensor", "allgather_fn", "all_gather_coalesced", "broadcast", "all_reduce",
             "reduce_scatter_tensor", "reduce_scatter_fn", "all_to_all_single"]
    called, originals = [], [(module, name, getattr(module, name)) for module in modules for name in names
                             if hasattr(module, name)]

    def counted(name, function):
        def call(*args, **kwargs):
            called.append(name)
            return function(*args, **kwargs)
        return call

    for module, name, function in originals:
        setattr(module, name, counted(name, function))
    try:
        yield called
    finally:
        for module, name, function in originals:
            setattr(module, name, function)


def batch(model, step: int, micro: int, rank: int) -> dict:
    """This rank's batch for a micro-batch: the example's layout, its own pixels and text."""
    inputs = tiny_llava.example_inputs(model, batch=2)
    gen = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=gen)
    text = inputs["labels"] != tiny_llava.IGNORE_INDEX
    inputs["input_ids"][text] = torch.randint(tiny_llava.IMAGE_TOKEN_ID + 1, model.config.vocab_size,
                                              (int(text.sum()),), generator=gen)
    inputs["labels"][text] = inputs["input_ids"][text]
    return inputs


def force(sparse, step: int, micro: int) -> None:
    if "skip_layers" in sparse.runtimes:
        sparse.runtimes["skip_layers"].force(PATTERNS[step][micro])


def make_optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, eps=1e-5)


# ------------------------------------------------------------------------------------------ engines
def wrap(args, sparse, full):
    """The trained module and ``step_fn(trained, batch, last) -> loss``: one micro-batch (and the step after the last)."""
    if args.engine in DEEPSPEED:
        return wrap_deepspeed(args, sparse)
    if args.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in sparse.report.model.blocks:
            fully_shard(sparse.model.get_submodule(block))
        fully_shard(sparse.model)
        if args.init == "meta":
            materialize(sparse.model, full)
        trained = sparse
    else:
        trained = torch.nn.parallel.DistributedDataParallel(sparse, find_unused_parameters=args.engine != "ddp")
        if args.engine == "ddp" and not args.no_attach:
            import stsc.integrations.ddp

            stsc.integrations.ddp.attach(trained, sparse)
    optimizer = make_optimizer(args.optimizer, sparse.parameters())

    def step_fn(module, inputs, last):
        local = args.local_accumulation and not last
        if args.engine == "fsdp2":
            sparse.model.set_requires_gradient_sync(not local)
        with module.no_sync() if local and args.engine != "fsdp2" else contextlib.nullcontext():
            loss = module(**inputs)["loss"]
            (loss / MICRO_BATCHES).backward()
        if last:
            torch.nn.utils.clip_grad_norm_(sparse.parameters(), CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return trained, step_fn


def deepspeed_config(args) -> dict:
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": MICRO_BATCHES,
              "gradient_clipping": CLIP, "zero_optimization": {"stage": int(args.engine[-1])},
              "zero_allow_untested_optimizer": True}
    if args.offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False  # the torch optimizer steps the offloaded partition
    return config


def wrap_deepspeed(args, sparse):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=sparse, optimizer=make_optimizer(args.optimizer, sparse.parameters()),
                                           config=deepspeed_config(args))
    if not args.no_attach:
        import stsc.integrations.deepspeed

        stsc.integrations.deepspeed.attach(engine, sparse)

    def step_fn(module, inputs, last):
        loss = module(**inputs)["loss"]
        module.backward(loss)
        module.step()
        return loss.item()

    return engine, step_fn


# ---------------------------------------------------------------------------------------- reference
def hf_trainer_zero3() -> None:
    import json
    import tempfile

    import hf_trainer

    blocks_run, original = [], hf_trainer.hf_models.llava  # decoder blocks run, per training forward

    def forward_begins(module, args):
        if module.training:
            blocks_run.append(0)

    def block_runs(module, args):
        if module.training:
            blocks_run[-1] += 1

    def llava_counting_blocks(**kwargs):
        model, batch = original(**kwargs)
        model.register_forward_pre_hook(forward_begins)
        for layer in model.model.language_model.layers:
            layer.register_forward_pre_hook(block_runs)
        return model, batch

    hf_trainer.hf_models.llava = llava_counting_blocks
    config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    path = Path(tempfile.mkdtemp()) / "ds_config.json"
    path.write_text(json.dumps(config))
    result = hf_trainer.main(["--epochs", "2", "--samples", "32", "--deepspeed", str(path)])
    if dist.get_rank() == 0:
        print(f"RESULT ok engine=hf-zero3 integration={result['sparse'].integration} "
              f"checked_on={result['sparse'].report.checked_on!r} losses={result['losses']} "
              f"stages={[stage for _, stage in result['stages']]} blocks_run={blocks_run}", flush=True)


class Reference:
    """A plain copy of the model in one process, trained on both ranks' batches of each micro-batch."""

    def __init__(self, model, optimizer: str, shared_step_count: bool):
        self.model = copy.deepcopy(model)
        self.sparse = stsc.sparsify(self.model, parse_policy(POLICY.format(seed=0)), batch(self.model, 0, 0, 0))
        self.optimizer = make_optimizer(optimizer, self.model.parameters())
        self.shared_step_count = shared_step_count
        self.max_diff = 0.0

    def step(self, step: int, world: int) -> None:
        for micro in range(MICRO_BATCHES):
            self.sparse.set_progress(step=step)
            state = self.sparse.schedule_state()
            for rank in range(world):
                self.sparse.load_schedule_state(state)  # every rank's batch sees this micro-batch's draws
                force(self.sparse, step, micro)
                loss = self.sparse(**batch(self.model, step, micro, rank))["loss"]
                (loss / (world * MICRO_BATCHES)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.shared_step_count:
            for state in self.optimizer.state.values():
                if "step" in state:
                    state["step"].fill_(step + 1)

    def flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])


def full_parameters(engine: str, sparse) -> torch.Tensor:
    """Every parameter, gathered in full, flattened in ``model.parameters()`` order (a collective for sharded engines)."""
    params = list(sparse.model.parameters())
    if engine == "fsdp2":
        return torch.cat([p.full_tensor().detach().reshape(-1) for p in params])
    if engine == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().reshape(-1).clone() for p in params])
    return torch.cat([p.detach().reshape(-1) for p in params])


def check(engine: str, step: int, sparse, reference, losses) -> None:
    mine = full_parameters(engine, sparse).float()
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    if reference is None:
        return
    skipper = sparse.runtimes.get("skip_layers")
    print(f"step {step} stage {sparse.stage} skipped {PATTERNS[step] if skipper else '-'} "
          f"losses {[round(x, 4) for x in losses]}", flush=True)
    for rank, theirs in enumerate(every[1:], start=1):
        if not torch.equal(theirs, every[0]):
            print(f"MISMATCH step {step}: rank {rank}'s parameters differ from rank 0's", flush=True)
            leave(1)
    diff = (every[0] - reference.flat()).abs()
    reference.max_diff = max(reference.max_diff, diff.max().item())
    if diff.max().item() > TOLERANCE:
        names = [n for n, p in sparse.model.named_parameters() for _ in range(getattr(p, "ds_numel", p.numel()))]
        print(f"MISMATCH step {step}: parameters differ from the single-process reference by "
              f"{diff.max().item():.3g} (first: {names[int(diff.argmax())]})", flush=True)
        leave(1)


def leave(code: int) -> None:
    """Exit now, before the engines' objects are freed: freeing them can block on a native gloo thread
    (seen here in about 1 run in 10), which would hang a finished run."""
    sys.stdout.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
