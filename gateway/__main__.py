"""`python -m gateway` is the `dind-gateway` command."""

import sys

from .cli import main

sys.exit(main())
