"""Multi-task channel pruning (importance -> plan -> physical removal -> report).

Nothing is implemented here yet: mtlkit does not offer pruning in this release, and no CLI
pretends to (there is no `mtl-prune` entry point until it exists).
"""
