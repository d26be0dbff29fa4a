"""Lowerings: how the passes' rewrites are realised. ``graph`` edits a captured FX graph (custom ops for the
compression, ``torch.cond`` around the blocks); the module lowering lives with each pass (hooks on modules)."""
