"""The optimizers of pretraining: Muon (Keller Jordan's; torch.optim.Muon with its Newton–Schulz step in a chosen
precision) for the blocks' matrices, AdamW for the rest (weight decay on matrices only), stepped and saved as one.

    make_optimizer(model, cfg, device)  the groups: Muon's matrices (`muon_parameters`), AdamW's decayed matrices, its
                                        undecayed vectors, and the input embeddings at their own lr (--embedding-lr)
"""

from __future__ import annotations

import torch

from llmkit.errors import LlmkitError
from llmkit.model.families import Embedding


class Optimizers:
    """Several optimizers stepped as one (Muon for the matrices, AdamW for the rest), with one state dict in the usual
    layout (parameters numbered across all of them in order), so checkpoints and GradScaler take it as one optimizer."""

    def __init__(self, *optimizers: torch.optim.Optimizer | None):
        self.optimizers: list[torch.optim.Optimizer] = [o for o in optimizers if o is not None]
        # this run's peaks and weight decays: a resumed state does not override them
        self.base_lrs = [g["base_lr"] for g in self.param_groups]
        self.weight_decays = [g["weight_decay"] for g in self.param_groups]

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: st for o in self.optimizers for p, st in o.state.items()}

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.optimizers:
            sd = o.state_dict()
            state.update({offset + i: st for i, st in sd["state"].items()})
            groups += [{**g, "params": [offset + i for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups = list(sd["param_groups"])
        if len(groups) != len(self.param_groups):
            raise LlmkitError(
                f"the checkpoint's optimizer has {len(groups)} parameter groups, this run's {len(self.param_groups)}",
                "resume with the same --optimizer (and --embedding-lr given or not) as the original run",
            )
        for o in self.optimizers:
            # torch maps a saved group's parameter keys (indices, or FSDP2's names) to its own by position
            mine, groups = groups[: len(o.param_groups)], groups[len(o.param_groups) :]
            keys = {k for g in mine for k in g["params"]}
            o.load_state_dict({"state": {k: st for k, st in sd["state"].items() if k in keys}, "param_groups": mine})
        for g, lr, wd in zip(self.param_groups, self.base_lrs, self.weight_decays):
            g["base_lr"], g["weight_decay"] = lr, wd


def _muon_base():
    if not hasattr(torch.optim, "Muon"):
        return torch.optim.Optimizer  # torch < 2.9: make_optimizer refuses --optimizer muon with a clear error
    return torch.optim.Muon


class Muon(_muon_base()):  # type: ignore[misc]
    """torch.optim.Muon (same state, same update), with the Newton–Schulz orthogonalization in `ns_dtype`. torch runs
    it in bfloat16, which pays on GPU tensor cores; on a CPU without AMX bfloat16 matrix products are slower than
    float32 ones: the default model's 24 matrices orthogonalize in 41 ms per step in float32 against 70 in bfloat16
    (2 cores, a fifth of the step). `ns_dtype=torch.bfloat16` is torch's own step, unchanged."""

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if getattr(self, "ns_dtype", torch.bfloat16) == torch.bfloat16:  # a copy (deepcopy, pickle) keeps torch's defaults only
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        from torch.optim._muon import _adjust_lr

        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse or torch.is_complex(p) or p.grad.dim() != 2:
                    raise RuntimeError("Muon takes dense real 2-D matrices only")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Keller Jordan's quintic Newton–Schulz iteration (torch.optim.Muon's), in `dtype`: about U Vᵀ of g = U S Vᵀ,
    computed on the wide orientation (X Xᵀ is the smaller Gram matrix)."""
    a, b, c = coefficients
    tall = g.size(0) > g.size(1)
    x = g.to(dtype)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):  # x <- a x + (b G + c G²) x, G = x xᵀ
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_parameters(model) -> list:
    """The matrices Muon trains: the weights of the hidden linear layers (the blocks' attention and feed-forward
    projections, and BERT's MLM transform and pooler). Embeddings, the LM head (tied or not), norms, biases and
    classifier heads stay with AdamW, as in modded-nanogpt."""
    from torch import nn

    head = getattr(model, "lm_head", None)
    skip = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    skip |= {id(p) for p in head.parameters()} if head is not None else set()
    classifier = getattr(model, "classifier", None)
    skip |= {id(p) for p in classifier.parameters()} if classifier is not None else set()
    return [
        m.weight
        for m in model.modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad and id(m.weight) not in skip and m.weight.dim() == 2
    ]


def _embedding_parameters(model) -> set[int]:
    """ids of the input embedding tables (tokens, learned positions, token types: the matrices of each family's
    embedding layer, not its norm nor T5's relative-position biases), less the LM head's when it is tied to them."""
    head = getattr(model, "lm_head", None)
    shared = {id(p) for p in head.parameters()} if head is not None else set()
    tables = {id(p) for m in model.modules() if isinstance(m, Embedding) for p in m.parameters() if p.dim() >= 2}
    if not tables - shared:
        raise LlmkitError(
            "--embedding-lr has no input embedding of its own to train: the model's embeddings are its (tied) LM head",
            "leave --embedding-lr out (--lr trains the tied matrix), or untie it: --model-option tie_embeddings=false",
        )
    return tables - shared


def make_optimizer(model, cfg, device: torch.device) -> Optimizers:
    """`--optimizer muon`: torch.optim.Muon (momentum, Newton–Schulz orthogonalized updates) for the blocks' matrices and
    AdamW for the rest; `--optimizer adamw`: AdamW for everything. AdamW decays matrices only (not biases, norms or
    1-D tensors) and is fused on CUDA. Each group keeps its peak lr as `base_lr` (the schedule scales it)."""
    if cfg.optimizer not in ("muon", "adamw"):
        raise LlmkitError(f"unknown optimizer {cfg.optimizer!r}", "use muon or adamw")
    if cfg.schedule not in ("wsd", "cosine") or not 0 < cfg.cooldown <= 1:
        raise LlmkitError(
            f"schedule {cfg.schedule!r} with cooldown {cfg.cooldown} is not valid", "use wsd or cosine, and a cooldown in (0, 1]"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    muon_params = muon_parameters(model) if cfg.optimizer == "muon" else []
    precision = cfg.muon_precision if cfg.muon_precision != "auto" else ("fp32" if device.type == "cpu" else "bf16")
    if precision not in ("fp32", "bf16"):
        raise LlmkitError(f"unknown Muon precision {cfg.muon_precision!r}", "use auto, fp32 or bf16")
    if muon_params and not hasattr(torch.optim, "Muon"):
        raise LlmkitError(f"torch {torch.__version__} has no torch.optim.Muon", "upgrade torch (2.9 or later), or use --optimizer adamw")
    in_muon = {id(p) for p in muon_params}
    rest = [p for p in params if id(p) not in in_muon]
    embeddings = _embedding_parameters(model) if cfg.embedding_lr is not None else set()
    decay = [p for p in rest if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in rest if p.dim() < 2]
    groups = [
        g
        for g in (
            {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr},
            {"params": [p for p in rest if id(p) in embeddings], "weight_decay": cfg.weight_decay, "base_lr": cfg.embedding_lr},
        )
        if g["params"]
    ]
    adamw = torch.optim.AdamW(
        [{**g, "lr": g["base_lr"]} for g in groups], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda"
    )
    muon = None
    if muon_params:
        # "original" adjusts the lr by sqrt(max(1, rows / columns)), as Keller Jordan's Muon; decoupled weight decay
        # p <- p (1 - lr * wd), scaled by the schedule as the update
        muon = Muon(
            [{"params": muon_params, "base_lr": cfg.muon_lr}],
            lr=cfg.muon_lr,
            momentum=cfg.muon_momentum,
            weight_decay=cfg.muon_weight_decay,
            nesterov=True,
            ns_dtype=torch.float32 if precision == "fp32" else torch.bfloat16,
        )
    return Optimizers(muon, adamw)
