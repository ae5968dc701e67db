"""Small helpers every part of the package uses: staged folders, error lines, config fields, the offline
SmolLM2, bitsandbytes' CPU layout, process groups and the merge export."""
