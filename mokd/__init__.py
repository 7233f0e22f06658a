"""mokd: Multi-mode Online Knowledge Distillation (MOKD, CVPR 2023) training engine.

`mokd.train(preset=..., overrides={...})` is the Python entry point (mokd/launch/api.py); the command line is
`mokd` (mokd/launch/cli.py).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazily: `import mokd.config` (the schema) must not pull in torch and the engine.
    if name in ("train", "TrainedRun"):
        from mokd.launch import api

        return getattr(api, name)
    raise AttributeError(f"module 'mokd' has no attribute {name!r}")
