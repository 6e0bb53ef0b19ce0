"""``python -m mepd`` is the ``mepd`` command."""

from mepd.cli import main

raise SystemExit(main())
