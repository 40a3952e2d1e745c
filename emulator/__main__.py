"""`python -m emulator` is the `minkms` command."""

from emulator.cli import main

raise SystemExit(main())
