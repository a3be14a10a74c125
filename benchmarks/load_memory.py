"""Peak resident memory of loading the embedded SmolLM2-135M-Instruct in bf16 (and fp32), each in a fresh process,
against transformers loading the same GGUF. The weights alone are 269 MB in bf16, 538 MB in float32.

    python benchmarks/load_memory.py
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import resource, sys, torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
engine, dtype = sys.argv[1], getattr(torch, sys.argv[2])
if engine == "llmkit":
    import llmkit
    model = llmkit.load("smollm2", dtype=dtype)
else:
    from transformers import AutoModelForCausalLM
    from llmkit.embedded import embedded_path
    path = embedded_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, weights / 2**20)
"""


def main() -> None:
    rows = []
    for engine in ("llmkit", "transformers"):
        for dtype in ("bfloat16", "float32"):
            out = subprocess.run([sys.executable, "-c", PROBE, engine, dtype], capture_output=True, text=True, check=True)
            peak, weights = map(float, out.stdout.split()[-2:])
            rows.append(
                {
                    "engine": engine,
                    "dtype": dtype,
                    "peak_mb_above_imports": round(peak),
                    "weights_mb": round(weights),
                    "peak_over_weights": round(peak / weights, 2),
                }
            )
            print(
                f"{engine:<13} {dtype:<9} peak {peak:7.0f} MB above imports, weights {weights:5.0f} MB: {peak / weights:.2f}x", flush=True
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
