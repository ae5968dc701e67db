"""``python -m lora_over_trl.sft`` (and ``accelerate launch -m lora_over_trl.sft``)."""

import sys

from lora_over_trl.sft.run import main

sys.exit(main())
