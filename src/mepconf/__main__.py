"""``python -m mepconf`` entry point."""

from __future__ import annotations

from mepconf.cli import main

raise SystemExit(main())
