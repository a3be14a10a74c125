"""Make `lm_eval --model llmkit ...` work beside lm-eval's own models (`hf`, `vllm`, `local-completions`, ...).

lm-evaluation-harness 0.4 has no entry point for third-party models, and its registry loads its own models only when
it is empty at the first `get_model` (lm_eval.api.registry.get_model imports lm_eval.models then). So llmkit registers
itself *after* them: a one-line `.pth` file in site-packages installs a meta-path finder (this module: `sys` only, a
few hundred microseconds at start-up) that waits for `lm_eval.api.registry` to be imported by whoever uses lm-eval;
right after that module runs, it imports `lm_eval.models` (which registers lm-eval's own models as lazy paths) and then
registers `llmkit` as the lazy path `llmkit.evaluate.harness:LlmkitLM`. A process that never imports lm-eval never
imports it or llmkit's evaluation code.

    python -m llmkit.evaluate.lm_eval_plugin --install     (make does this in .venv)
    python -m llmkit.evaluate.lm_eval_plugin --uninstall
"""

from __future__ import annotations

import sys

PTH = "llmkit_lm_eval.pth"
TARGET = "lm_eval.api.registry"
MODEL = ("llmkit", "llmkit.evaluate.harness:LlmkitLM")


def register(registry_module) -> None:
    """lm-eval's own models first (lazy paths: nothing heavy is imported), then llmkit."""
    import importlib

    importlib.import_module("lm_eval.models")
    if MODEL[0] not in registry_module.model_registry:
        registry_module.model_registry.register(MODEL[0], target=MODEL[1])


class _Loader:
    """lm-eval's registry module loaded as usual, then `register` run on it."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        register(module)


class Finder:
    """A meta-path finder that wraps the loader of lm-eval's registry module (and nothing else)."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)  # type: ignore[assignment]  # duck-typed: importlib.abc costs start-up time
        return spec


def install_hook() -> None:
    if "lm_eval.api.registry" in sys.modules:  # lm-eval came first (imported before this hook): register now
        register(sys.modules["lm_eval.api.registry"])
    elif not any(isinstance(f, Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, Finder())


def main() -> None:
    import argparse
    import sysconfig
    from pathlib import Path

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
        print(f"lm_eval --model llmkit is registered beside lm-eval's own models ({path})")
    else:
        p.print_help()


if __name__ == "__main__":
    main()
