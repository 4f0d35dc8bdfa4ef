"""`python -m zdepth` is the `zdepth` command: how servers start their own worker processes."""

from zdepth.cli import main

raise SystemExit(main())
