"""``python -m cdcca_edge.cli`` (e.g. under ``accelerate launch -m cdcca_edge.cli ...``)."""

import sys

from cdcca_edge.cli import main

sys.exit(main())
