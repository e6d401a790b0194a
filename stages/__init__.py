"""The ``wsss`` command line: one module per stage, each exposing ``run(cfg)`` and a click command."""
