"""`python -m diffinject.convert adm CKPT --out DIR`: see `diffinject.convert.cli`."""

from diffinject.convert.cli import main

raise SystemExit(main())
