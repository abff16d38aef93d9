"""Entry point of ``python -m pilot.train``."""
from .cli import main

raise SystemExit(main())
