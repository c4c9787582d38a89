"""``python -m sweeperd`` is the ``sweeperd`` command."""

from .cli import main

raise SystemExit(main())
