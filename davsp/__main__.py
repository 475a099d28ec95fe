"""`python -m davsp`: the CLI without the installed entry point (e.g. a machine where pip cannot run)."""

from .cli import main

raise SystemExit(main())
