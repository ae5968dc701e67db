"""GLoRA (arXiv 2306.07967): a supernet of support tensors, an evolutionary search, a merged model at the end.

``config`` (what the user asks), ``model`` (the supernet layer), ``callback`` (sampling during training),
``search`` (the evolutionary search), ``export`` (the merged model, or a LoRA adapter where the choice allows).
"""
