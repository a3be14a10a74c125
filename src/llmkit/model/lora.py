"""Parameter-efficient fine-tuning: freeze the model, add a few new parameters. Two kinds.

LoRA (Hu et al. 2021): a frozen linear layer W plus a trainable low-rank update B·A, scaled by alpha / r
(or alpha / sqrt(r) with rsLoRA, Kalajievski 2023). B starts at zero, so training starts from the base model.

        x ──► W (frozen) ────────────────┐
        │                                (+) ──► y = W x + (alpha / r) · B A dropout(x)
        └──► dropout ──► A (r×in) ──► B (out×r) ┘

    merge: W ← W + (alpha / r) · B A   (no extra cost at inference);  unmerge: W back to the exact base weights

Bottleneck adapters (Houlsby et al. 2019): after each feed-forward block, a small residual MLP
    h ──► h + up(act(down(h)))     down: d → bottleneck, up: bottleneck → d (zero-initialized)

Adapters are saved apart from the model, LoRA in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`,
Hugging Face parameter names) so that `peft` loads them on the model's Hugging Face export. Where the export stacks
several of our projections in one matrix (Phi-3's qkv_proj, gate_up_proj), their LoRAs are one LoRA on it of rank k·r:
A = [A_q; A_k; A_v] (k·r × in) and B block-diagonal, B_q in q's rows and A_q's columns (a projection left out: zero
rows), alpha k·alpha (k·r ranks, the same scale), in PEFT's `rank_pattern` / `alpha_pattern`. Read back, each part
takes the whole A and its own rows of B (rank k·r): the same update, and any PEFT adapter on such a matrix loads too.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmkit import io
from llmkit.errors import LlmkitError
from llmkit.model.convert.hf import fused_name, fused_rows, hf_config_for, hf_name
from llmkit.model.convert.tensors import read_safetensors
from llmkit.model.quantize import Int4Linear


class LoRALinear(nn.Module):
    disabled = False  # the adapter switched off: the base layer alone (DPO's reference, `preference.reference_mode`)

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        """`base`: an nn.Linear, or a frozen 4-bit one (QLoRA: `Int4Linear`, bitsandbytes' `Linear4bit`)."""
        super().__init__()
        if r < 1:
            raise LlmkitError(f"LoRA rank {r} must be at least 1", "use --lora-r 8 (or 4, 16, ...)")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        # beside the base layer, in float32 even when the base is bf16/fp16 (as PEFT: small updates survive AdamW)
        where = next(itertools.chain(base.parameters(), base.buffers())).device
        like = dict(device=where, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT: A random, B zero
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged or self.disabled:
            return y
        h = self.dropout(x).to(self.lora_A.dtype)
        return y + (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if isinstance(self.base, Int4Linear) or type(getattr(self.base, "weight", None)).__name__ == "Params4bit":
            raise LlmkitError(
                "LoRA on a 4-bit base (QLoRA) does not merge into it: the sum would be rounded to 4 bits again",
                "save the adapter (PEFT format) and load it on the float base model",
            )
        if not self.merged:
            self._base_copy = self.base.weight.detach().clone()  # unmerge restores these bits exactly (W + d - d may not)
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.copy_(self._base_copy)
            del self._base_copy
            self.merged = False


class Adapter(nn.Module):
    """A feed-forward block followed by a bottleneck adapter: h = f(x); h + up(act(down(h)))."""

    def __init__(self, inner: nn.Module, d_model: int, bottleneck: int):
        super().__init__()
        self.inner = inner
        for p in inner.parameters():
            p.requires_grad_(False)
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        h = self.inner(x)
        return h + self.up(F.gelu(self.down(h)))


LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _targets(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the nn.Linear modules to adapt: 'all-linear' (every projection in the blocks, not the LM head), a list
    of short names (q_proj, v_proj, ...), or a regular expression on the full name."""
    linear = (nn.Linear, Int4Linear)  # a QLoRA base's frozen 4-bit layers too
    names = [n for n, m in model.named_modules() if isinstance(m, linear) and "lm_head" not in n and "classifier" not in n]
    if target_modules == "all-linear" or target_modules == ["all-linear"]:
        chosen = [n for n in names if n.rsplit(".", 1)[-1] in LINEAR_NAMES]
    elif isinstance(target_modules, (list, tuple)):
        chosen = [n for n in names if n.rsplit(".", 1)[-1] in target_modules]
    else:
        pattern = re.compile(target_modules)
        chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        raise LlmkitError(
            f"no linear layer matches the LoRA targets {target_modules!r}",
            f"use 'all-linear', names like q_proj,v_proj, or a pattern; the model has e.g. {names[:3]}",
        )
    return chosen


def _refuse_blocks(model: nn.Module) -> None:
    """A model decoding from a GGUF file's blocks (`quantize.BlockLinear`) is for inference: its compiled step reads
    the blocks, which a LoRA (or its merge) would not change."""
    if any(type(m).__name__ == "BlockLinear" for m in model.modules()):
        raise LlmkitError(
            "LoRA on a model that decodes from its GGUF blocks would not change what the compiled step computes",
            "load the model without quantizing it (llmkit.load(...) as it is, --quantize none) to fine-tune or apply an adapter",
        )


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def apply_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    rslora: bool = False,
) -> list[str]:
    """Freeze `model` and wrap the targeted linear layers in LoRALinear; returns their names."""
    _refuse_blocks(model)
    freeze(model)
    names = _targets(model, target_modules)
    for name in names:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, rslora))
    model.lora_config = {
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
    }
    return names


def apply_adapters(model: nn.Module, bottleneck: int = 32) -> int:
    """Freeze `model` and put a bottleneck adapter after every feed-forward block; returns how many."""
    freeze(model)
    blocks = [m for m in model.modules() if hasattr(m, "mlp") and hasattr(m, "mlp_norm")]
    for block in blocks:
        block.mlp = Adapter(block.mlp, model.config.d_model, bottleneck)
    return len(blocks)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()


def merge_and_unwrap(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base layer and put the plain nn.Linear back (for saving a whole model)."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent_name, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), child, layer.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def trainable_share(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters: a 4-bit base's weights, held as buffers, counted too)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Int4Linear))  # a QLoRA base's
    return trainable, total


# --- saving adapters apart, in PEFT's format ---------------------------------------------------------------------


def _hf_name(model, name: str) -> str:
    """Our module name -> the Hugging Face module name of the model's export (for PEFT's adapter keys); a projection
    stacked with others (Phi-3's) -> the stacked matrix's name."""
    model_type = hf_config_for(model.config)["model_type"]
    rows = fused_rows(model_type, model.config, name + ".weight")
    if rows is not None:
        return rows[0][: -len(".weight")]
    fused = fused_name(model_type, name + ".weight")
    if fused is not None:
        raise LlmkitError(
            f"{model_type} stores {name} inside {fused} with other projections: a LoRA on it has no PEFT name",
            "target the projections stored alone (e.g. o_proj, down_proj), or keep the merged model (llmkit model export)",
        )
    hf = hf_name(model_type, name + ".weight")
    if hf is None:
        raise LlmkitError(f"no Hugging Face name for {name}", "adapt only attention and feed-forward projections")
    return hf[: -len(".weight")]


def check_peft_names(model: nn.Module) -> None:
    """Refuse, before any training, a model whose LoRA layers have no PEFT names (GPT-2's fused attention): their
    adapter could not be saved apart (and a QLoRA adapter cannot be merged instead)."""
    for name in lora_layers(model):
        _hf_name(model, name)


def _portable_base(name: str | None) -> str | None:
    """The base model as the adapter should name it: an embedded name as it is, a folder or file as an absolute path
    (a relative one would break as soon as the run is used from another directory)."""
    from llmkit.embedded import EMBEDDED

    if name is None or name in EMBEDDED or not Path(name).exists():
        return name
    return str(Path(name).resolve())


def _peft_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int], dict[str, float]]:
    """(PEFT's tensors, rank_pattern, alpha_pattern) of the model's LoRA layers: one pair per layer, or one per stacked
    matrix of the export (Phi-3's), block-wise (module docstring)."""
    layers = lora_layers(model)
    model_type = hf_config_for(model.config)["model_type"]
    tensors, ranks, alphas = {}, {}, {}
    done = set()
    for name, layer in layers.items():
        hf = _hf_name(model, name)
        key = f"base_model.model.{hf}"
        rows = fused_rows(model_type, model.config, name + ".weight")
        if rows is None:
            tensors[f"{key}.lora_A.weight"] = layer.lora_A.detach().contiguous().cpu()
            tensors[f"{key}.lora_B.weight"] = layer.lora_B.detach().contiguous().cpu()
            if layer.r != model.lora_config["r"] or layer.alpha != model.lora_config["lora_alpha"]:  # a layer of its own rank
                ranks[hf], alphas[hf] = layer.r, layer.alpha
            continue
        if hf in done:
            continue
        done.add(hf)
        parts = [(p[: -len(".weight")], n) for p, n in rows[1]]
        adapted = [layers[p] for p, _ in parts if p in layers]
        scaling = adapted[0].scaling
        if any(abs(a.scaling - scaling) > 1e-12 * scaling for a in adapted):
            raise LlmkitError(f"the LoRAs stacked in {hf} have different scales", "give them one rank and alpha")
        shared = len(adapted) == len(parts) and all(torch.equal(a.lora_A, adapted[0].lora_A) for a in adapted)
        if shared:  # one A for every part (an adapter read from such a matrix): B stacked by rows, the rank kept
            r = adapted[0].r
            A = adapted[0].lora_A.detach().float().cpu()
            B = torch.cat([a.lora_B.detach().float().cpu() for a in adapted])
        else:  # A stacked, B block-wise
            r = sum(a.r for a in adapted)
            A = torch.cat([a.lora_A.detach().float().cpu() for a in adapted])  # (k·r, in)
            B = torch.zeros(sum(n for _, n in parts), r)
            row = col = 0
            for p, n in parts:
                if p in layers:
                    B[row : row + n, col : col + layers[p].r] = layers[p].lora_B.detach().float().cpu()
                    col += layers[p].r
                row += n
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A.contiguous(), B.contiguous()
        rslora = bool(model.lora_config.get("use_rslora"))
        alpha = scaling * (math.sqrt(r) if rslora else r)  # PEFT's scale alpha / r (alpha / sqrt(r)) stays this one
        if r != model.lora_config["r"] or abs(alpha - model.lora_config["lora_alpha"]) > 1e-9 * alpha:
            ranks[hf], alphas[hf] = r, alpha
    return tensors, ranks, alphas


def save_lora(model: nn.Module, directory, base_model_name: str | None = None) -> Path:
    """Write `adapter_config.json` and `adapter_model.safetensors` (PEFT's names for the model's HF export)."""
    from safetensors.torch import save

    if not lora_layers(model):
        raise LlmkitError("the model has no LoRA layers to save", "apply LoRA first (--method lora)")
    tensors, ranks, alphas = _peft_tensors(model)
    cfg = dict(model.lora_config)
    targets = sorted({k[len("base_model.model.") :].rsplit(".", 2)[0].rsplit(".", 1)[-1] for k in tensors})
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with io.atomic_open(directory / "adapter_model.safetensors", "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    io.write_json(
        directory / "adapter_config.json",
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM" if model.config.family == "decoder" else "FEATURE_EXTRACTION",
            "r": cfg["r"],
            "lora_alpha": cfg["lora_alpha"],
            "lora_dropout": cfg["lora_dropout"],
            "use_rslora": cfg["use_rslora"],
            "target_modules": targets if ranks else cfg["target_modules"],
            "rank_pattern": ranks,
            "alpha_pattern": alphas,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "base_model_name_or_path": _portable_base(base_model_name),
            "init_lora_weights": True,
        },
    )
    return directory


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it (at a dot)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_lora(model: nn.Module, directory) -> list[str]:
    """Apply the LoRA adapter saved in `directory` (ours or PEFT's, same format) to `model`: each adapted module's rank
    from its tensors, its alpha from `alpha_pattern` or the config; a stacked matrix's adapter (Phi-3's qkv_proj)
    given to each of our projections in it (the whole A, its own rows of B)."""
    directory = Path(directory)
    if not (directory / "adapter_config.json").exists():
        raise LlmkitError(f"{directory} has no adapter_config.json", "point at a folder written by `llmkit finetune --method lora`")
    cfg = io.read_json(directory / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        what = "DoRA" if cfg.get("use_dora") else cfg.get("peft_type")
        raise LlmkitError(f"the adapter in {directory} is a {what} adapter; llmkit reads LoRA adapters", "train a LoRA adapter")
    tensors = read_safetensors(directory / "adapter_model.safetensors")
    model_type = hf_config_for(model.config)["model_type"]
    rslora = cfg.get("use_rslora", False)
    _refuse_blocks(model)
    plan, used = [], set()  # (our layer's name, A, B, alpha): checked whole before the model changes
    for name in _targets(model, "."):  # every linear layer but the heads
        try:
            hf = _hf_name(model, name)
        except LlmkitError:  # no PEFT name (GPT-2's fused attention): no adapter tensor can be meant for it
            continue
        key = f"base_model.model.{hf}"
        if f"{key}.lora_A.weight" not in tensors:
            continue
        if f"{key}.lora_B.weight" not in tensors:
            raise LlmkitError(f"the adapter in {directory} lacks {key}.lora_B.weight", "save the adapter again with this model")
        used.update((f"{key}.lora_A.weight", f"{key}.lora_B.weight"))
        A, B = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
        rows = fused_rows(model_type, model.config, name + ".weight")
        if rows is not None:  # our part's rows of the stacked matrix's B
            first = 0
            for part, n in rows[1]:
                if part == name + ".weight":
                    B = B[first : first + n]
                    break
                first += n
        base = model.get_submodule(name)
        if tuple(B.shape) != (base.out_features, A.shape[0]) or A.shape[1] != base.in_features:
            raise LlmkitError(f"the adapter's {key} does not fit {name} of this model", "load it on the model it was trained on")
        plan.append((name, A, B, _pattern_value(cfg.get("alpha_pattern"), hf, cfg["lora_alpha"])))
    unplaced = sorted(k for k in tensors if k not in used)
    if unplaced or not plan:
        what = f"{unplaced[0]}" + (f" (and {len(unplaced) - 1} more)" if len(unplaced) > 1 else "") if unplaced else "no LoRA layer"
        raise LlmkitError(
            f"the adapter in {directory} holds {what} that llmkit cannot place on this model",
            "load it on the model it was trained on (llmkit reads LoRA on linear layers; not modules_to_save or embeddings)",
        )
    freeze(model)
    names = []
    for name, A, B, alpha in plan:
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child), A.shape[0], alpha, 0.0, rslora)
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        setattr(parent, child, layer)
        names.append(name)
    model.lora_config = {
        "r": cfg["r"],
        "lora_alpha": cfg["lora_alpha"],
        "lora_dropout": cfg.get("lora_dropout", 0.0),
        "use_rslora": rslora,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
    }
    return names


def apply_method(
    model: nn.Module,
    method: str,
    *,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_targets: str = "all-linear",
    rslora: bool = False,
    adapter_size: int = 32,
) -> nn.Module:
    """`model` made ready for a fine-tuning `method`: "lora" (its targets: 'all-linear', short names such as
    q_proj,v_proj, or else a regular expression on the full module name), "adapter", or "full" (unchanged)."""
    if method == "lora":
        names = [t.strip() for t in lora_targets.split(",")]
        targets = names if all(n in LINEAR_NAMES for n in names) else lora_targets
        apply_lora(model, lora_r, lora_alpha, lora_dropout, targets, rslora)
    elif method == "adapter":
        apply_adapters(model, adapter_size)
    elif method != "full":
        raise LlmkitError(f"unknown method {method!r}", "use full, lora or adapter")
    return model


METHOD_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets", "rslora", "adapter_size")  # apply_method's options
