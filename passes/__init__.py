"""Graph passes of stsc, one per module, installed as ``stsc.passes``.

Each pass states in its docstring the pattern it matches and what it rewrites.
"""
