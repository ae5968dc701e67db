"""``python -m lora_over_trl.analyze``."""

import sys

from lora_over_trl.analyze.command import main

sys.exit(main())
