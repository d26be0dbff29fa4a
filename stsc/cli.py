"""The ``stsc`` command line.

    stsc inspect   model.py [--json]                         what capture and match find
    stsc transform model.py policy.yaml [--stage S] [--lowering modules|graph] [--out D]
                                                             apply a policy, verify it, report
    stsc validate  policy.yaml                               check a policy file
    stsc profile   model.py [--policy P] [--tolerance T] [--out D]  measure redundancy, propose a policy
    stsc plot      policy.yaml -o schedule.png [--layers L]  skip probability per layer over each stage

Exit codes: 0 ok; 2 usage error, bad model file or bad policy; 3 model not supported (it could not be
captured, a step of the analysis failed on it, the policy's passes need structure the matcher did not find, or
no decoder blocks for ``inspect``).
``model.py`` is *executed* to build the model: only run stsc on files you trust.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from .capture import CaptureError, forward_kwargs
from .loader import ModelFileError, load_model_and_batches, load_model_file
from .passes.compress_visual_tokens import METHODS
from .policy import PolicyError, load_policy
from .profile import KEEP_RATIOS, check_arguments, profile
from .proposal import DEFAULT_TOLERANCE
from .report import inspect
from .schedules import layer_probabilities
from .lowering.graph import GraphStage, lower_stage
from .sparse import SparseModel, UnsupportedModelError, model_loss, sparsify

EXIT_OK, EXIT_USAGE, EXIT_UNSUPPORTED = 0, 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stsc", description="Stage-aware sparse training for multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    model_help = "Python file defining build_model() and example_inputs() (it is executed)"
    policy_help = "stage policy: a YAML file or a preset name (sts, vtc, lds, dense)"

    cmd = commands.add_parser("inspect", help="capture a model and report its decoder blocks and vision boundary")
    cmd.add_argument("model_file", help=model_help)
    cmd.add_argument("--json", action="store_true", help="print the report as JSON")

    cmd = commands.add_parser("transform", help="apply a stage policy to a model, verify it and report")
    cmd.add_argument("model_file", help=model_help)
    cmd.add_argument("policy", help=policy_help)
    cmd.add_argument("--stage", help="apply only this stage (default: every stage in turn)")
    cmd.add_argument("--lowering", choices=("modules", "graph"), default="modules",
                     help="lowering the verification step trains: module hooks (default) or the rewritten graph")
    cmd.add_argument("--out", type=Path, help="write report.json, the applied policy and, per stage, the rewritten "
                                              "graph (stage_<name>.py) and its exported program (stage_<name>.pt2)")

    cmd = commands.add_parser("validate", help="check a stage policy and print what it says")
    cmd.add_argument("policy", help=policy_help)

    cmd = commands.add_parser("profile", help="measure token and layer redundancy on training batches, propose a policy")
    cmd.add_argument("model_file", help=model_help + "; an optional batches() yields the training batches to measure")
    cmd.add_argument("--policy", default="sts", help="the base policy the proposal fills in (default: sts)")
    cmd.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                     help=f"loss increase the proposal may cost, as a fraction of the dense loss (default {DEFAULT_TOLERANCE})")
    cmd.add_argument("--methods", default=",".join(METHODS), help="compression methods to measure, comma-separated "
                                                                  "(default: all)")
    cmd.add_argument("--samples", type=int, default=8, help="skip patterns drawn to check the proposed schedule")
    cmd.add_argument("--seed", type=int, default=0, help="set before every forward (default 0)")
    cmd.add_argument("--out", type=Path, help="write profile.json, profile.png and the proposed policy.yaml here")

    cmd = commands.add_parser("plot", help="plot the skip probability of each layer over each stage (matplotlib)")
    cmd.add_argument("policy", help=policy_help)
    cmd.add_argument("-o", "--output", type=Path, default=Path("schedule.png"), help="image to write")
    cmd.add_argument("--layers", type=int, default=32, help="number of decoder layers L (default 32)")

    args = parser.parse_args(argv)
    try:
        return {"inspect": _inspect, "transform": _transform, "validate": _validate, "plot": _plot,
                "profile": _profile}[args.command](args)
    except (ModelFileError, PolicyError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except (UnsupportedModelError, CaptureError) as exc:
        return _fail(f"{args.model_file}: model not supported: {exc}", EXIT_UNSUPPORTED)


def _fail(message: str, code: int) -> int:
    print(f"stsc: error: {message}", file=sys.stderr)
    return code


def _progress(message: str) -> None:
    print(f"stsc: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------- inspect
def _inspect(args) -> int:
    model, inputs = load_model_file(args.model_file)
    _progress(f"capturing {args.model_file} ...")
    report = inspect(model, inputs)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.format())
    if not report.supported:
        reason = next(note for note in report.notes if note.startswith("no decoder blocks found"))
        return _fail(f"{args.model_file}: model not supported: {reason}", EXIT_UNSUPPORTED)
    return EXIT_OK


# ----------------------------------------------------------------------------------- transform
def _transform(args) -> int:
    policy = load_policy(args.policy)
    if args.stage is not None:
        policy.stage(args.stage)  # an unknown name is a PolicyError: exit 2 before the model is built
    model, inputs = load_model_file(args.model_file)
    kwargs = forward_kwargs(model, inputs)[0]
    with torch.no_grad():
        dense = _first_float(model.eval()(**kwargs))
    model.train()
    _progress(f"capturing {args.model_file} and applying {policy.source} ...")
    sparse = sparsify(model, policy, inputs, stage=args.stage)
    print(sparse.report.format())
    graphs = _graph_stages(sparse, inputs) if args.out or args.lowering == "graph" else {}
    checks = []
    for stage in sparse.report.stages:
        _progress(f"verifying stage {stage.name!r} ...")
        graph = graphs.get(stage.name)
        if args.lowering == "graph" and not isinstance(graph, GraphStage):
            return _fail(f"{args.model_file}: stage {stage.name!r}: graph lowering not available: {graph}",
                         EXIT_UNSUPPORTED)
        checks.append(_verify(sparse, stage.name, kwargs, dense, graph if args.lowering == "graph" else None))
        c = checks[-1]
        same = (f"; loss equals the module lowering's: {'yes' if c['equals_modules'] else 'NO'}"
                if "equals_modules" in c else "")
        print(f"verified {stage.name!r} ({c['lowering']} lowering): train step ran (loss {c['loss']:.4f}, decoder "
              f"sequence {c['sequence']}, blocks skipped {c['skipped']}, {c['params_with_grad']}/{c['params']} "
              f"parameters got gradients{same}); eval equals dense: {'yes' if c['eval_equals_dense'] else 'NO'}")
    if args.out:
        _write_out(args.out, sparse, policy, checks, graphs)
        print(f"wrote {args.out}/report.json, {args.out}/policy.yaml and, per stage the graph lowering supports, "
              f"stage_<name>.py and stage_<name>.pt2 (and stage_<name>_dense.* where some forwards are drawn dense)")
    failed = [c["stage"] for c in checks if not (c["eval_equals_dense"] and c["loss_finite"]
                                                  and c.get("equals_modules", True))]
    if failed:
        return _fail(f"verification failed for stage(s) {', '.join(failed)}", EXIT_UNSUPPORTED)
    return EXIT_OK


def _graph_stages(sparse: SparseModel, inputs: dict) -> dict[str, GraphStage | str]:
    """Each stage lowered to a rewritten graph, or why it cannot be."""
    stages = {}
    for stage in sparse.report.stages:
        verdict = stage.lowerings["graph"]
        if verdict.startswith("not available"):
            stages[stage.name] = verdict.removeprefix("not available: ")
            continue
        _progress(f"lowering stage {stage.name!r} to a rewritten graph ...")
        try:
            with sparse.without_passes() as model:
                stages[stage.name] = lower_stage(model, sparse.policy.stage(stage.name), sparse.structure, inputs)
        except UnsupportedModelError as exc:  # GraphLoweringUnavailable, or a match of the exported graph failed
            stages[stage.name] = str(exc)
        print(f"graph lowering of {stage.name!r}: " + ("; ".join(r.summary() for r in stages[stage.name].rewrites)
                                                       if isinstance(stages[stage.name], GraphStage)
                                                       else f"not available: {stages[stage.name]}"))
    return stages


def _verify(sparse: SparseModel, stage: str, kwargs: dict, dense: torch.Tensor, graph: GraphStage | None) -> dict:
    """One training forward + backward in ``stage`` (at its start, every block the schedule may skip skipped),
    then eval compared with the dense output. With ``graph``, the step runs the rewritten graph and its loss is
    compared with the module lowering's for the same decisions."""
    _enter(sparse, stage)
    sequence = []  # the sequence length entering the first block that runs (a skipped block runs no hook)
    hooks = [sparse.model.get_submodule(path).register_forward_pre_hook(
        lambda module, args, kwargs: sequence.append(_first_float((*args, *kwargs.values())).shape[1]),
        with_kwargs=True) for path in sparse.report.model.blocks]
    skipper = sparse.runtimes.get("skip_layers")
    pattern = skipper.trial_pattern() if skipper else None
    if skipper:
        skipper.force(pattern)
    sparse.train().zero_grad(set_to_none=True)
    loss = model_loss(sparse(**kwargs))
    result = {"stage": stage, "lowering": "graph" if graph else "modules"}
    if graph is not None:
        graph.set_progress(epoch=0.0, step=sparse.step)
        graph.force(pattern)
        graph_loss = model_loss(graph(**kwargs))
        result["equals_modules"] = bool(torch.allclose(graph_loss, loss, rtol=1e-6, atol=1e-6))
        sparse.zero_grad(set_to_none=True)
        loss = graph_loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    if skipper:
        skipper.force(None)
    trainable = [p for p in sparse.model.parameters() if p.requires_grad]
    with_grad = sum(p.grad is not None for p in trainable)
    with torch.no_grad():
        eval_out = _first_float((graph.eval() if graph else sparse.eval())(**kwargs))
    sparse.zero_grad(set_to_none=True)
    sparse.train()
    return {**result, "loss": loss.item(), "loss_finite": bool(torch.isfinite(loss)),
            "sequence": sequence[0] if sequence else None,
            "skipped": pattern or [], "params": len(trainable), "params_with_grad": with_grad,
            "eval_equals_dense": bool(torch.equal(eval_out, dense))}


def _enter(sparse: SparseModel, stage: str) -> None:
    if sparse.fixed_stage is None:
        start = sparse.policy.stage(stage).start
        sparse.set_progress(**({"step": int(start)} if sparse.policy.unit == "steps" else {"epoch": start}))


def _first_float(output) -> torch.Tensor:
    """The first floating-point tensor of rank >= 2 in ``output`` (a dict, a sequence or a tensor)."""
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else [output]
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
            return value
    raise TypeError(f"the model returned no floating-point tensor of rank >= 2 ({type(output).__name__})")


def _write_out(out: Path, sparse: SparseModel, policy, checks: list[dict], graphs: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    rewrites = {name: [r.summary() for r in g.rewrites] if isinstance(g, GraphStage) else f"not available: {g}"
                for name, g in graphs.items()}
    (out / "report.json").write_text(json.dumps({**sparse.report.to_dict(), "verification": checks,
                                                 "graph_rewrites": rewrites}, indent=2, default=str))
    import yaml

    (out / "policy.yaml").write_text(yaml.safe_dump(policy.to_dict(), sort_keys=False))
    for name, graph in graphs.items():
        if isinstance(graph, GraphStage):
            _progress(f"writing the rewritten graph of stage {name!r} ...")
            header = [f"# stsc: stage {name!r} of {policy.source}, lowered to a rewritten graph (stsc.transform)."]
            header += [f"# {r.summary()}" for r in graph.rewrites]
            (out / f"stage_{name}.py").write_text("\n".join(header) + "\n"
                                                  + graph.graph_module.print_readable(print_output=False))
            torch.export.save(graph.exported, out / f"stage_{name}.pt2")
            if graph.exported_dense is not None:  # the graph the forwards drawn dense run
                header[0] = header[0].replace("a rewritten graph", "a rewritten graph without the compression, for "
                                              "the forwards drawn dense")
                (out / f"stage_{name}_dense.py").write_text(
                    "\n".join(header) + "\n" + graph.exported_dense.module().print_readable(print_output=False))
                torch.export.save(graph.exported_dense, out / f"stage_{name}_dense.pt2")


# ------------------------------------------------------------------------------------- profile
def _profile(args) -> int:
    load_policy(args.policy)  # a bad base policy is a PolicyError: exit 2 before the model is built
    try:
        methods, _ = check_arguments(args.methods.split(","), KEEP_RATIOS, args.samples, args.tolerance)
    except ValueError as exc:
        return _fail(str(exc), EXIT_USAGE)
    picture = args.out is not None and importlib.util.find_spec("matplotlib") is not None
    model, inputs, batches = load_model_and_batches(args.model_file)
    _progress(f"capturing {args.model_file} and profiling it on {len(batches)} batch(es) ...")
    result = profile(model, batches, inputs, tolerance=args.tolerance, policy=args.policy, methods=methods,
                     samples=args.samples, seed=args.seed, progress=_progress)
    print(result.format())
    if args.out is None:
        print("\n" + result.proposal.yaml(), end="")
        return EXIT_OK
    written = result.write(args.out, picture)
    print(f"wrote {', '.join(str(path) for path in written)}")
    if not picture:
        _progress("profile.png not written: it needs matplotlib (pip install 'stsc[plot]')")
    return EXIT_OK


# ------------------------------------------------------------------------------ validate, plot
def _validate(args) -> int:
    policy = load_policy(args.policy)
    print(f"{policy.source}: valid, version {policy.version}, seed {policy.seed}, {len(policy.stages)} stage(s)")
    for stage in policy.stages:
        print(f"  {stage.name}: {stage.unit} {stage.start:g} to {stage.end:g}")
        for entry in stage.passes or ():
            print(f"    {entry.name}: {entry.config}")
        if not stage.passes:
            print("    dense (no passes)")
    return EXIT_OK


def _plot(args) -> int:
    policy = load_policy(args.policy)
    if args.layers < 1:
        return _fail(f"--layers must be >= 1, got {args.layers}", EXIT_USAGE)
    stages = [(stage, stage.pass_config("skip_layers")) for stage in policy.stages]
    stages = [(stage, config) for stage, config in stages if config is not None]
    if not stages:
        return _fail(f"{policy.source}: no stage runs skip_layers; nothing to plot", EXIT_USAGE)
    try:
        import matplotlib
    except ModuleNotFoundError:
        return _fail("stsc plot needs matplotlib: pip install 'stsc[plot]'", EXIT_USAGE)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4), squeeze=False)
    for ax, (stage, config) in zip(axes[0], stages):
        schedule = config.skip_schedule()
        points = [stage.length * k / 100 for k in range(101)]
        curves = list(zip(*(layer_probabilities(schedule, args.layers, e) for e in points)))
        colours = plt.cm.viridis([layer / max(args.layers - 1, 1) for layer in range(args.layers)])
        for layer, (curve, colour) in enumerate(zip(curves, colours)):
            ax.plot([stage.start + e for e in points], curve, color=colour, linewidth=1,
                    label=f"layer {layer}" if layer in (0, args.layers - 1) else None)
        ax.set(title=f"stage {stage.name!r}: {schedule.schedule}, alpha {schedule.alpha}, eps {schedule.eps}",
               xlabel=stage.unit, ylabel="skip probability", ylim=(0, 1))
        ax.legend()
    figure.tight_layout()
    figure.savefig(args.output, dpi=100)
    print(f"wrote {args.output} ({len(stages)} stage(s), {args.layers} layers)")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
