"""The `llmpipe` command.

    llmpipe run --config FILE [--set k=v]... [--run-dir DIR] [--until STAGE,...] [--only STAGE] [--force STAGE]...
    llmpipe STAGE --config FILE [--run-dir DIR] [--set k=v]...     one stage, no Prefect
    llmpipe pretrain --config FILE --nproc N                       a training stage on N processes (torchrun)
    llmpipe export --run-dir DIR --stage STAGE --out DIR
    llmpipe generate --run-dir DIR --stage STAGE --prompt TEXT [...]
    llmpipe serve --config FILE --cron "0 3 * * *"                 a schedule served by this process
    llmpipe deploy --config FILE --pool NAME [--cron "0 3 * * *"]   a deployment run by a work pool's workers
    llmpipe plan --config FILE --gpus N --gpu-mem GiB [--nodes K]   memory per GPU of each parallel layout
    llmpipe reproduce RUN_ID [--run-dir DIR]                       rebuild a run from its MLflow record, compare hashes
    llmpipe compare RUN_A RUN_B                                    two runs side by side: config, cache keys, metrics

Only `run`, `reproduce`, `serve` and `deploy` reach the orchestration layer (`flows/`), imported lazily: the
library itself never imports Prefect. Errors that are the user's to fix print one line and exit 2;
a failed stage prints one line (its traceback is in its log) and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llmpipe import config as configlib
from llmpipe import console
from llmpipe.errors import BadValue
from llmpipe.paths import RunDir
from llmpipe.redact import redact
from llmpipe.runner import (
    add_config_args,
    add_stage_args,
    add_verbose,
    handle_errors,
    load_config,
    quiet_library_consoles,
    run_stage,
)
from llmpipe.stages import plan_stages, stage_names


def _stage_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in stage_names()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage {', '.join(unknown) or repr(text)}; "
                                         f"stages: {', '.join(stage_names())}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmpipe", description="From raw web pages to a trained language model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the pipeline as a Prefect flow (tracked, cached, resumable)")
    add_config_args(run)
    run.add_argument("--until", type=_stage_list, metavar="STAGE[,STAGE...]",
                     help="run these stages and what they need, nothing else (e.g. dpo,ppo)")
    run.add_argument("--only", choices=stage_names(), metavar="STAGE",
                     help="run this stage alone in the flow, its inputs taken from the run directory")
    run.add_argument("--force", action="append", default=[], choices=stage_names(), metavar="STAGE",
                     help="rerun this stage even if its cache is valid; repeatable")
    add_verbose(run)

    for name in stage_names():
        add_stage_args(commands.add_parser(name, help=f"run the {name} stage alone, without Prefect"), name)

    export = commands.add_parser("export", help="write a Hugging Face folder from a training stage")
    export.add_argument("--run-dir", type=Path, required=True)
    export.add_argument("--stage", default="pretrain", help="the stage whose weights to export")
    export.add_argument("--out", type=Path, required=True)

    generate = commands.add_parser("generate", help="sample a completion with the KV cache")
    generate.add_argument("--run-dir", type=Path, required=True)
    generate.add_argument("--stage", default="pretrain")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int, default=0)

    chat = commands.add_parser("chat", help="talk with a stage's model (sft, dpo, ...): replies streamed, turns kept")
    chat.add_argument("--run-dir", type=Path, required=True)
    chat.add_argument("--stage", default="sft", help="any completed stage with release weights")
    chat.add_argument("--prompt", help="answer this one message, print only the reply, and exit")
    chat.add_argument("--system", help="a system message that opens the conversation")
    chat.add_argument("--max-new-tokens", type=int, help="longest reply (default: 256 or half the context)")
    chat.add_argument("--temperature", type=float, help="0 = greedy (default: 0.7)")
    chat.add_argument("--top-k", type=int, help="sample from the k likeliest tokens (default: all)")
    chat.add_argument("--top-p", type=float, help="sample from the likeliest tokens covering p (default: 0.9)")
    chat.add_argument("--seed", type=int, default=0)

    serve = commands.add_parser("serve", help="register a scheduled deployment (needs `prefect server start`)")
    add_config_args(serve)
    serve.add_argument("--cron", required=True, help='cron schedule, e.g. "0 3 * * *"')
    serve.add_argument("--name", help="deployment name (default: run.name)")
    serve.add_argument("--until", type=_stage_list, metavar="STAGE[,STAGE...]", help="each run stops after these")

    deploy = commands.add_parser("deploy", help="register a deployment on a work pool (needs a Prefect server)")
    add_config_args(deploy)
    deploy.add_argument("--pool", required=True, help="work pool name; its workers run the flow")
    deploy.add_argument("--cron", help='cron schedule, e.g. "0 3 * * *" (default: runs only when triggered)')
    deploy.add_argument("--name", help="deployment name (default: run.name)")
    deploy.add_argument("--until", type=_stage_list, metavar="STAGE[,STAGE...]", help="each run stops after these")

    plan = commands.add_parser("plan", help="memory per GPU of each parallel layout for pretraining, and which fit")
    plan.add_argument("--config", required=True, type=Path, help="YAML config, e.g. configs/llama-7b.yaml")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a config value (parsed as YAML); repeatable")
    plan.add_argument("--gpus", required=True, type=int, help="GPUs per node")
    plan.add_argument("--gpu-mem", required=True, type=float, metavar="GiB", help="memory of one GPU in GiB")
    plan.add_argument("--nodes", type=int, help="nodes (default: pretrain.nnodes)")

    tracking_help = "the MLflow store (default: MLFLOW_TRACKING_URI, else runs/mlflow.db)"
    reproduce = commands.add_parser("reproduce", help="rebuild a run from its MLflow record and check every stage's hashes")
    reproduce.add_argument("run_id", help="the pipeline's MLflow run id (or any of its stage runs')")
    reproduce.add_argument("--run-dir", type=Path, help="where to rebuild it (default: runs/<name>-<first 8 of RUN_ID>)")
    reproduce.add_argument("--tracking-uri", help=tracking_help)
    add_verbose(reproduce)

    compare = commands.add_parser("compare", help="two runs side by side, and what made the first differing stage differ")
    compare.add_argument("run_a", help="an MLflow run id of a pipeline run")
    compare.add_argument("run_b", help="another")
    compare.add_argument("--tracking-uri", help=tracking_help)
    return parser


def set_orchestration_defaults() -> None:
    """Prefect's embedded API keeps its database under the project, with a start-up timeout long
    enough for a fresh database on 2 cores; MLflow and Prefect stay quiet about telemetry."""
    os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")


def _run(args: argparse.Namespace) -> int:
    config = load_config(args)  # fail on a bad config, or an unknown or disabled stage, before Prefect starts
    plan_stages(config, args.until, args.only)
    summary = _run_flow(args.verbose, config_path=str(args.config), overrides=list(args.overrides),
                        run_dir=str(args.run_dir) if args.run_dir else None,
                        until=args.until, only=args.only, force=list(args.force))
    _print_summary(config, summary)
    return 0


def _run_flow(verbose: bool, **parameters) -> dict:
    set_orchestration_defaults()
    quiet_library_consoles(verbose)
    console.install(verbose)
    from flows.pipeline import pipeline

    console.route_logging()  # importing Prefect configured logging
    return pipeline(**parameters)


def _tracking_uri(args: argparse.Namespace) -> str:
    from llmpipe.tracking import tracking_uri

    return args.tracking_uri or tracking_uri()


def _reproduce(args: argparse.Namespace) -> int:
    """The recorded config on the recorded WARCs, as a flow run in a new directory; then each
    stage's hashes against the record. Exit 1 when a stage differs."""
    from llmpipe import lineage

    uri = _tracking_uri(args)
    record = lineage.load_record(uri, args.run_id)
    run_dir = args.run_dir or Path("runs") / f"{record.name}-{record.run_id[:8]}"
    inputs = run_dir / ".inputs"  # hidden: the record's files, not outputs of the reproduction
    runs = lineage.replay(record, lineage.fetch_warcs(uri, record, inputs))
    print(f"reproducing run {record.run_id} ({record.name}: {', '.join(record.stages)}) in {run_dir}")
    for generation, (config, until) in enumerate(runs):
        config_path = inputs / ("config.yaml" if generation == len(runs) - 1 else f"config-generation-{generation}.yaml")
        config_path.write_text(configlib.to_yaml(config))
        configlib.load(config_path, run_dir=run_dir)  # a record from another llmpipe version fails here, in one line
        if len(runs) > 1:
            print(f"crawl generation {generation} of {len(runs) - 1}: {', '.join(until)}")
        summary = _run_flow(args.verbose, config_path=str(config_path), run_dir=str(run_dir), until=until)
    matches = lineage.match_stages(record, run_dir, uri)
    print(f"\n{lineage.format_matches(matches)}")
    print(f"\nMLflow run:    {summary['mlflow_run_id']} in {redact(uri)}")
    differing = [m.name for m in matches if not m.matches]
    if differing:
        print(f"llmpipe reproduce: {len(differing)} stage{'s' if len(differing) > 1 else ''} differ: "
              f"{', '.join(differing)} (compare: llmpipe compare {record.run_id} {summary['mlflow_run_id']})",
              file=sys.stderr)
        return 1
    print(f"every stage of run {record.run_id} reproduced: the same hashes")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from llmpipe import lineage

    uri = _tracking_uri(args)
    print(lineage.compare(lineage.load_record(uri, args.run_a), lineage.load_record(uri, args.run_b)))
    return 0


def _print_summary(config: configlib.RunConfig, summary: dict) -> None:
    from llmpipe.tracking import tracking_uri

    uri = tracking_uri(config.run_dir.parent)
    report_file = RunDir(config.run_dir).report_json
    if "eval" in summary["stages"] and report_file.is_file():
        from llmpipe.eval.report import terminal_table

        print(f"\n{terminal_table(json.loads(report_file.read_text()))}")
        print(f"report:        {RunDir(config.run_dir).report_md}")
    print(f"\nrun directory: {config.run_dir}   (logs: {config.run_dir / 'logs'})")
    print(f"MLflow run:    {summary['mlflow_run_id']} in {redact(uri)}")
    print(f"  UI:          mlflow ui --backend-store-uri {redact(uri)}   (then http://127.0.0.1:5000)")
    print(f"Prefect run:   {summary['flow_run_id']}")
    print(f"  UI:          PREFECT_HOME={os.environ['PREFECT_HOME']} prefect server start   (then http://127.0.0.1:4200)")


def _export(args: argparse.Namespace) -> int:
    from llmpipe.export import export_hf

    print(export_hf(args.run_dir, args.stage, args.out))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from llmpipe.generate import generate_text

    print(generate_text(args.run_dir, args.stage, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed))
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llmpipe.chat import answer_once, chat_loop, load_session

    given = {key: getattr(args, key) for key in ("max_new_tokens", "temperature", "top_k", "top_p")}
    session = load_session(args.run_dir, args.stage, system=args.system, seed=args.seed,
                           **{key: value for key, value in given.items() if value is not None})  # else the library's defaults
    if args.prompt is not None:
        answer_once(session, args.prompt)
        return 0
    return chat_loop(session)


def _deployment_parameters(args: argparse.Namespace, config: configlib.RunConfig) -> dict:
    """The flow's parameters for every run of a deployment: absolute paths, as runs start elsewhere."""
    plan_stages(config, args.until)  # an unknown or disabled stage fails now, not at 3 a.m.
    return {"config_path": str(args.config.resolve()), "overrides": list(args.overrides),
            "run_dir": str(args.run_dir.resolve()) if args.run_dir else None, "until": args.until}


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    set_orchestration_defaults()
    from flows.pipeline import serve

    serve(_deployment_parameters(args, config), name=args.name or config.run.name, cron=args.cron)
    return 0


def _deploy(args: argparse.Namespace) -> int:
    config = load_config(args)
    set_orchestration_defaults()
    from flows.pipeline import deploy

    deployment_id = deploy(_deployment_parameters(args, config), name=args.name or config.run.name,
                           pool=args.pool, cron=args.cron)
    print(f"deployment llmpipe/{args.name or config.run.name} ({deployment_id}) on work pool {args.pool!r}; "
          f"start a worker: prefect worker start --pool {args.pool}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from llmpipe.distributed.plan import Cluster, format_plan, make_plan

    config = configlib.load(args.config, args.overrides)
    nodes = args.nodes if args.nodes is not None else config.pretrain.nnodes
    if args.gpus < 1 or nodes < 1 or args.gpu_mem <= 0:
        raise BadValue(f"--gpus {args.gpus}, --nodes {nodes}, --gpu-mem {args.gpu_mem}: each must be positive")
    cluster = Cluster(gpus_per_node=args.gpus, gpu_mem_gib=args.gpu_mem, nodes=nodes)
    print(format_plan(config, cluster, make_plan(config, cluster)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": _run, "export": _export, "generate": _generate, "serve": _serve,
               "deploy": _deploy, "plan": _plan, "chat": _chat,
               "reproduce": _reproduce, "compare": _compare}.get(args.command, run_stage)
    return handle_errors(args.command, lambda: handler(args))


if __name__ == "__main__":
    sys.exit(main())
