"""One file per decoder family, each over `pagedserve.model.layers`; `registry.py` maps HF names to them."""
