"""`python -m serving` is `python -m serving.cli`."""

from serving.cli import main

raise SystemExit(main())
