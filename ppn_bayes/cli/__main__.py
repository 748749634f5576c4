"""``python -m ppn_bayes.cli`` (what ``torchrun -m ppn_bayes.cli fit ...`` runs on every rank)."""

import sys

from ppn_bayes.cli import main

sys.exit(main())
