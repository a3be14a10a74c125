"""Decoding speed of the embedded SmolLM2-135M-Instruct, batch 1: llmkit against `transformers` (the same dequantized
weights) and llama.cpp (`llama-cpp-python`, the same GGUF, if installed), in one run on this machine.

    python benchmarks/decode_speed.py                 # CPU, 2 threads: decode tokens/s and prompt (512 tokens) tokens/s
    python benchmarks/decode_speed.py --device cuda --batch-sizes 1,32 --dtypes bf16
    python benchmarks/decode_speed.py --dtypes int4 --engine-batches 1,4,16 --skip transformers   # the server's engine

Each figure is the median of --repeats runs. llama.cpp is a benchmark extra (`pip install llama-cpp-python`, see
benchmarks/RESULTS.md for the build flags), never a test dependency.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import llmkit
from llmkit.generate import GenerationConfig, stream_batch
from llmkit.model.compiled import use_compiled_decode

DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "gguf": torch.float32,  # the GGUF's own blocks in the compiled step: the default's (exact) weights
    "int8": torch.float32,
    "int4": torch.float32,
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def prompt_ids(tok, n: int) -> list[int]:
    from llmkit.data.sources import shakespeare

    return tok.encode(shakespeare("hamlet")[0].text, add_special_tokens=False)[:n]


def bench_llmkit(model, prompt: list[int], new: int, batch: int, device) -> tuple[float, float]:
    """(prompt tokens/s, decode tokens/s) through llmkit's own generation loop: the prompt rate is the time to the
    first new token of the whole prompt (prefill and the first choice), the decode rate that of `new` tokens after an
    8-token prompt."""
    tok = model.tokenizer
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        for _ in stream_batch(model, tok, [prompt] * batch, GenerationConfig(max_new_tokens=1, do_sample=False, stop_token_ids=[])):
            pass
        sync(device)
        prefill = time.perf_counter() - start
        cfg = GenerationConfig(max_new_tokens=new, do_sample=False, stop_token_ids=[])
        start = time.perf_counter()
        steps = 0
        for _ in stream_batch(model, tok, [prompt[:8]] * batch, cfg):
            steps += 1
        sync(device)
        decode = time.perf_counter() - start
    return batch * len(prompt) / prefill, batch * steps / decode


def bench_engine(model, prompt: list[int], new: int, batch: int) -> tuple[float, float]:
    """(0, decode tokens/s of all rows together) through the server's engine (continuous batching): `batch` requests of
    `new` greedy tokens after an 8-token prompt, submitted together; the rate counts every row's tokens after its first."""
    import threading

    from llmkit.serve.engine import Engine, Request

    engine = Engine(model, "bench", max_batch=max(batch, 1), max_queue=batch)
    try:
        firsts: list[float] = []
        done = threading.Semaphore(0)
        counts = [0] * batch

        def emitter(i):
            def emit(event):
                if event[0] == "token":
                    counts[i] += 1
                    if counts[i] == 1:
                        firsts.append(time.perf_counter())
                else:
                    done.release()

            return emit

        cfg = GenerationConfig(max_new_tokens=new, do_sample=False, stop_token_ids=[])
        engine.submit([Request(list(prompt[:8]), cfg, emitter(i)) for i in range(batch)])
        for _ in range(batch):
            done.acquire()
        end = time.perf_counter()
    finally:
        engine.close()
    return 0.0, (sum(counts) - batch) / (end - max(firsts))


def bench_transformers(model, prompt: list[int], new: int, batch: int, device) -> tuple[float, float]:
    ids = torch.tensor([prompt] * batch, device=device)
    short = ids[:, :8]
    with torch.no_grad():
        sync(device)
        start = time.perf_counter()
        model(ids)
        sync(device)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(
            short, attention_mask=torch.ones_like(short), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=2
        )
        sync(device)
        decode = time.perf_counter() - start
    return batch * len(prompt) / prefill, batch * (out.shape[1] - short.shape[1]) / decode


def bench_llama_cpp(path: str, prompt: list[int], new: int, threads: int, flash: bool) -> tuple[float, float]:
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=max(1024, len(prompt) + new + 16), n_threads=threads, n_batch=512, verbose=False, flash_attn=flash)
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - start
    llm.reset()
    llm.eval(prompt[:8])
    start = time.perf_counter()
    for _ in range(new):
        token = llm.sample(temp=0.0)
        llm.eval([token])
    decode = time.perf_counter() - start
    return len(prompt) / prefill, new / decode


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", default="1")
    p.add_argument(
        "--dtypes",
        default="fp32,bf16,gguf,int8,int4",
        help="fp32, bf16, gguf (the GGUF's own blocks: the default), int8, int4 (llmkit's weight-only int8 / int4; no transformers peer)",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--engine-batches", default="", help="also decode through the server's engine with these many requests at once, e.g. 1,4,16"
    )
    p.add_argument(
        "--compile", default="both", choices=["on", "off", "both"], help="llmkit's decode step compiled, eager, or both (default)"
    )
    p.add_argument("--skip", default="", help="comma list of engines to skip: llmkit,transformers,llama.cpp")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    skip = set(args.skip.split(","))
    base = llmkit.load("smollm2")
    prompt = prompt_ids(base.tokenizer, args.prompt_tokens)
    print(
        f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{args.threads} threads'}), "
        f"torch {torch.__version__}; SmolLM2-135M-Instruct, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, "
        f"median of {args.repeats}"
    )
    rows = []

    def record(engine, dtype, batch, fn):
        results = [fn() for _ in range(args.repeats)]
        pre, dec = statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)
        rows.append((engine, dtype, batch, pre, dec))
        print(f"{engine:<14} {dtype:<5} batch {batch:>3}: prompt {pre:>9,.0f} tokens/s   decode {dec:>9,.1f} tokens/s", flush=True)

    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        for batch in map(int, args.batch_sizes.split(",")):
            if "llmkit" not in skip:
                model = llmkit.load("smollm2", dtype=dtype, device=device, quantize=name if name in ("gguf", "int8", "int4") else None)
                for compiled in [False, True] if args.compile == "both" else [args.compile == "on"]:
                    use_compiled_decode(model, compiled)
                    engine = "llmkit compiled" if compiled else "llmkit"
                    record(engine, name, batch, lambda: bench_llmkit(model, prompt, args.new_tokens, batch, device))
                    for n in [int(x) for x in args.engine_batches.split(",") if x] if batch == 1 else []:
                        bench_engine(model, prompt, 8, n)  # the engine's warm-up (compiles) is not timed
                        record(f"{engine} engine", name, n, lambda: bench_engine(model, prompt, args.new_tokens, n))
                del model
            if "transformers" not in skip and name not in ("gguf", "int8"):
                from transformers import AutoModelForCausalLM

                from llmkit.embedded import embedded_path

                path = embedded_path("smollm2")
                hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype).to(device).eval()
                record("transformers", name, batch, lambda: bench_transformers(hf, prompt, args.new_tokens, batch, device))
                del hf
    if "llama.cpp" not in skip and device.type == "cpu":
        try:
            import llama_cpp  # noqa: F401

            from llmkit.embedded import embedded_path

            for flash in (False, True):
                record(
                    f"llama.cpp{' FA' if flash else ''}",
                    "Q4_1",
                    1,
                    lambda: bench_llama_cpp(str(embedded_path("smollm2")), prompt, args.new_tokens, args.threads, flash),
                )
        except ImportError:
            print("llama.cpp: llama-cpp-python is not installed (a benchmark extra; see benchmarks/RESULTS.md)")
    print("\nratios (decode, prompt) against transformers of the same dtype and batch (int8, int4: against fp32):")
    for engine, dtype, batch, pre, dec in rows:
        ref = [r for r in rows if r[0] == "transformers" and r[1] == ("fp32" if dtype in ("int8", "int4") else dtype) and r[2] == batch]
        if ref and engine != "transformers":
            print(f"  {engine} {dtype} batch {batch}: decode {dec / ref[0][4]:.2f}x, prompt {pre / ref[0][3]:.2f}x")
    lc = [r for r in rows if r[0] == "llama.cpp"]
    if lc:
        for engine, dtype, batch, pre, dec in rows:
            if engine.startswith("llmkit") and batch == 1:
                print(f"  {engine} {dtype} vs llama.cpp: decode {dec / lc[0][4]:.2f}x, prompt {pre / lc[0][3]:.2f}x")


if __name__ == "__main__":
    main()
