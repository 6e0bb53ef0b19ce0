"""``python -m mepd.uep``: the user endpoint entry point (see ``mepd.uep``)."""

from mepd.uep import main

raise SystemExit(main())
