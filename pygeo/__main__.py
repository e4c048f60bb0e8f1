"""`python -m pygeo ...`: the command line (see pygeo.cli)."""
from .cli import main

raise SystemExit(main())
