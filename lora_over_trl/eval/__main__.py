"""``python -m lora_over_trl.eval``."""

import sys

from lora_over_trl.eval.command import main

sys.exit(main())
