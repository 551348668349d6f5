"""The command-line entry points (mtl-train, mtl-export, mtl-extract) and what they share."""


from mtl.lazy import attributes as _lazy  # noqa: E402

__getattr__, __dir__ = _lazy(globals())  # submodules (the job runners) load on first use
