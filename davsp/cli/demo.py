"""`davsp demo`: the whole method on the shipped safety-world model (davsp.demo)."""

from __future__ import annotations

from ..demo import DemoConfig, run_demo


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the whole method on the shipped safety-world model (CPU, minutes)")
    p.add_argument("--out", default="davsp-demo", help="output directory (must be new or empty)")
    p.add_argument("--steps", type=int, default=DemoConfig.steps, help="VSP training steps")
    p.add_argument("--seed", type=int, default=DemoConfig.seed)
    p.add_argument("--space", default=DemoConfig.space, help="normalized (published) or pixel")
    p.add_argument("--defenses", default=",".join(DemoConfig.defenses),
                   help="comma-separated rows to run (default: all); only the VSPs they use are trained")
    p.set_defaults(func=lambda args: run_demo(args.out, DemoConfig(
        steps=args.steps, seed=args.seed, space=args.space,
        defenses=tuple(d.strip() for d in args.defenses.split(",") if d.strip()))) and 0)
