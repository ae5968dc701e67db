"""Analysis of trained adapters: spectra of the updates and loss landscapes, as tables and pictures.

python -m lora_over_trl.analyze spectrum runs/demo_cpu --vs runs/demo_cpu_lora
"""

from lora_over_trl.analyze.command import main

__all__ = ["main"]
