"""`davsp reproduce`, and the endpoint flags `davsp generate` shares with it (davsp.endpoint, davsp.reproduce)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DavspError
from .common import add_model_args, count, load_model

REPRODUCED = ("mm-safetybench", "figstep", "vlguard", "mm-vet", "mme", "llava-bench")


def add_endpoint_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("an OpenAI-compatible server instead of --model (vLLM, SGLang, davsp serve)")
    group.add_argument("--endpoint", help="its base URL, e.g. http://gpu-node:8000/v1; each record is sent framed and "
                                          "prefixed exactly as the local path feeds the model, decoded greedily")
    group.add_argument("--served-model", help="the model name the server serves (its /v1/models id)")
    group.add_argument("--concurrency", type=count(1), default=8, help="requests in flight (default: 8)")
    group.add_argument("--endpoint-key-env", default="",
                       help="environment variable holding the server's API key (default: none sent)")


def endpoint_from_args(args):
    from ..endpoint import Endpoint

    if not args.served_model:
        raise DavspError("--endpoint needs --served-model NAME (the model id the server lists at /v1/models)")
    return Endpoint(args.endpoint, args.served_model, api_key_env=args.endpoint_key_env, concurrency=args.concurrency)


def cmd_reproduce(args) -> int:
    from ..reproduce import EndpointModel, LocalModel, Reproduction, run_reproduction

    if bool(args.model) == bool(args.endpoint):
        raise DavspError("give either --model PATH (generate here) or --endpoint URL --served-model NAME (a server)")
    if args.endpoint:
        model = EndpointModel(endpoint_from_args(args))
    else:
        model = LocalModel(args.model, lambda: load_model(args), batch_size=args.batch_size)
    benchmarks = {name: Path(getattr(args, name.replace("-", "_"))) for name in REPRODUCED
                  if getattr(args, name.replace("-", "_"))}
    judge_options = {key: value for key, value in (("url", args.judge_url), ("model", args.judge_model),
                                                   ("api_key_env", args.judge_key_env)) if value is not None}
    if args.judge != "refusal" and "model" not in judge_options:
        raise DavspError(f"--judge {args.judge} needs --judge-model (and --judge-url for an llm judge)")
    if bool(args.grader_url) != bool(args.grader_model):
        raise DavspError("the MM-Vet / LLaVA-Bench grader needs both --grader-url and --grader-model")
    grader = {"url": args.grader_url, "model": args.grader_model, "api_key_env": args.grader_key_env} \
        if args.grader_url else None
    job = Reproduction(
        out=Path(args.out), benchmarks=benchmarks, model=model, vsp_path=Path(args.vsp) if args.vsp else None,
        defenses=tuple(d.strip() for d in args.defenses.split(",") if d.strip()), judge=args.judge,
        judge_options=judge_options, grader=grader, tiny=args.tiny, limit=args.limit, split=args.split,
        max_new_tokens=args.max_new_tokens, bootstrap=args.bootstrap, seed=args.seed)
    run_reproduction(job, progress=not args.no_progress)
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "reproduce", help="the paper's Tables 1 and 2: every benchmark x defense, judged, evaluated, reported",
        description="Generate (a local --model or an --endpoint), judge, evaluate and report every benchmark given "
                    "under every defense, resumably: interrupt it anywhere and rerun the same command to continue.")
    p.add_argument("--out", required=True, help="run folder (responses/, judged/, eval/, tables.md, report.html)")
    add_model_args(p, required=False)
    add_endpoint_args(p)
    p.add_argument("--vsp", help="VSP .safetensors for the vsp and davsp defenses (pixel-space for --endpoint)")
    p.add_argument("--defenses", default="none,prefix,vsp,davsp", help="comma-separated (default: all four)")
    roots = p.add_argument_group("benchmark folders (each in its upstream layout; see `davsp data`)")
    for name in REPRODUCED:
        roots.add_argument(f"--{name}", metavar="DIR", help=f"{name} root folder")
    p.add_argument("--tiny", action="store_true",
                   help="a quick pass: the official tiny versions (MM-SafetyBench, FigStep), the first 20 records "
                        "of the others")
    p.add_argument("--limit", type=count(1), help="only the first N records of each benchmark")
    p.add_argument("--split", help="train, val or test (seeded split; VLGuard: its own test file by default)")
    p.add_argument("--max-new-tokens", type=count(1), default=1024, help="answer length (default: 1024, as published)")
    p.add_argument("--batch-size", type=count(1), default=8, help="local generation batch (default: 8)")
    judging = p.add_argument_group("judging")
    judging.add_argument("--judge", default="refusal",
                         help="safety judge: refusal (offline; a refusal rate), llm (RSR, as published), harmbench "
                              "or llamaguard (default: refusal)")
    judging.add_argument("--judge-url", help="OpenAI-compatible URL of the llm judge (or of a served harmbench/"
                                             "llamaguard model)")
    judging.add_argument("--judge-model", help="the judge model: its name at --judge-url, or a local folder / hub id")
    judging.add_argument("--judge-key-env", help="environment variable holding the judge's API key ('' for none)")
    judging.add_argument("--grader-url", help="OpenAI-compatible URL of the MM-Vet / LLaVA-Bench grader (GPT-4 in "
                                              "the paper); without it those two are not graded")
    judging.add_argument("--grader-model", help="the grader model's name at --grader-url")
    judging.add_argument("--grader-key-env", default="OPENAI_API_KEY",
                         help="environment variable holding the grader's API key (default: OPENAI_API_KEY; '' for none)")
    p.add_argument("--bootstrap", type=count(0), default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of the sample choice")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars (the plan and ETA lines stay)")
    p.set_defaults(func=cmd_reproduce)
