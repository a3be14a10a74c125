"""Make `lm_eval --model llmkit ...` work: lm-evaluation-harness has no plugin entry point for models, so a one-line
`.pth` file in site-packages installs this import hook, which registers `llmkit` (lazily, as the path
`llmkit.evaluate.harness:LlmkitLM`) the moment lm-eval's model registry is imported. Nothing else is imported at start-up.

    python -m llmkit.evaluate.lm_eval_plugin --install     (make does this in .venv)
    python -m llmkit.evaluate.lm_eval_plugin --uninstall
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

PTH = "llmkit_lm_eval.pth"
TARGET = "lm_eval.api.registry"


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        if "llmkit" not in module.model_registry:
            module.model_registry.register("llmkit", target="llmkit.evaluate.harness:LlmkitLM")


class Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of lm-eval's registry module so that `llmkit` is registered right after it runs."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install_hook() -> None:
    if not any(isinstance(f, Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, Finder())


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="register llmkit as an lm-eval model type (`lm_eval --model llmkit`)")
    p.add_argument("--install", action="store_true")
    p.add_argument("--uninstall", action="store_true")
    args = p.parse_args()
    path = Path(sysconfig.get_paths()["purelib"]) / PTH
    if args.uninstall:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    elif args.install:
        path.write_text("import llmkit.evaluate.lm_eval_plugin as _h; _h.install_hook()\n")
        print(f"lm_eval --model llmkit is registered ({path})")
    else:
        p.print_help()


if __name__ == "__main__":
    main()
