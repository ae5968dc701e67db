"""The methods LoRA-Over grew from, on the same PEFT LoRA layers, each in its own folder: ``cla/`` (cLA, random
cLA, c3LA, random c3LA) and ``glora/`` (GLoRA). :mod:`lora_over_trl.registry` names every method."""
