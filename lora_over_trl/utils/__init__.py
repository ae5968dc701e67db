"""Small helpers every part of the package uses: PEFT's LoRA layers by name, staged folders, error lines, config
fields, the offline SmolLM2, bitsandbytes' CPU layout, process groups, collectives and the merge export."""
