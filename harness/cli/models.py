"""`flashbench models`: list the embedded models."""

from __future__ import annotations

import json

from flashbench import suite

from .common import EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list the embedded models", description="List the embedded default models.")
    p.set_defaults(func=cmd_models)


def cmd_models(args) -> int:
    for name in suite.EMBEDDED_MODELS:
        path = suite.model_path(name)
        try:
            hf = json.loads((path / "config.json").read_text())
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            act = hf.get("hidden_act") or hf.get("activation_function")
            print(f"{name:28s} {hf['model_type']:6s} {act:5s} layers={hf['num_hidden_layers']} "
                  f"d_model={hf['hidden_size']} "
                  f"{size / 2**20:.1f} MiB  {path}")
        except (OSError, KeyError, json.JSONDecodeError) as e:
            print(f"{name:28s} unreadable: {e}")
    return EXIT_OK
