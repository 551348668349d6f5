"""The command-line entry points (mtl-train, mtl-export, mtl-extract) and what they share."""


def __getattr__(name):
    from mtl.lazy import submodule

    return submodule(__name__, name)  # e.g. the job runner's module, without importing it first


def __dir__():
    from mtl.lazy import names

    return names(globals())
