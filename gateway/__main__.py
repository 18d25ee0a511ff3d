"""`python -m gateway` is the `dind-gateway` command."""

import sys

from .app import main

sys.exit(main())
