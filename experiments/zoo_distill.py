"""The zoo drafter's training data and the zoo's realism and speed figures (used by train_zoo.py).

* `target_samples`: the target's own samples at the CFG scale the demo decodes with, generated through
  `specdec.generate` in resumable chunks. The drafter is trained on them (sequence-level distillation: the drafter
  learns the guided law p_cfg itself), so at decode time it drafts unguided (`ModelDrafter(..., draft_cfg=1.0)`).
* `teacher`: per sample, the target's conditional features h_t and its guided law p_t (top-k probabilities and
  ids: soft labels), teacher-forced; the drafter (soft-label distillation) and the EAGLE head train on them.
* `realism`: how flat the target is where it samples: the share of positions whose top-1 probability is below 5 %,
  the mean entropy, at CFG 1 and at the demo's scale; GSD measured 50-95 % of such positions on Lumina-mGPT.
* `overlap`: sum_v min(p, q), the exact rule's acceptance probability per drafted token.
* `speed`: the target's step at batch 1, a 5-token verification relative to it, and one drafter call relative to it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

import specdec
from specdec import Sampling
from specdec.adapters import GPTAdapter
from specdec.bench.timing import step_costs
from specdec.sampling import to_probs


def target_samples(target: GPTAdapter, n: int, cfg: float, batch: int, seed: int, num_classes: int, work: Path,
                   log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of the target at cfg (temperature 1): (tokens int16 [n, T], classes [n]); chunks of `batch` are
    saved in `work` as they finish, so a killed run continues where it stopped."""
    tokens, classes = [], []
    t0 = time.time()
    for i in range(math.ceil(n / batch)):
        path = work / f"samples_cfg{cfg:g}_seed{seed}_b{batch}_{i}.pt"
        if not path.is_file():
            cond = (torch.arange(batch) + i * batch) % num_classes
            res = specdec.generate(target, cond, sampling=Sampling(cfg_scale=cfg), seed=seed * 100_003 + i,
                                   decode=False)
            tmp = path.with_suffix(".tmp")
            torch.save((res.tokens.short(), cond), tmp)
            tmp.rename(path)
            log(f"samples cfg {cfg:g}: {(i + 1) * batch}/{n} ({time.time() - t0:.0f} s)")
        t, c = torch.load(path)
        tokens.append(t)
        classes.append(c)
    return torch.cat(tokens)[:n], torch.cat(classes)[:n]


@torch.no_grad()
def guided_probs(model, tokens: torch.Tensor, classes: torch.Tensor, cfg: float) -> torch.Tensor:
    """p [N, T, V] of a zoo GPT at every position of tokens [N, T] with class guidance cfg (temperature 1)."""
    cond = model.forward_train(tokens, classes)
    uncond = model.forward_train(tokens, torch.full_like(classes, model.null_class)) if cfg != 1 else None
    return to_probs(cond, uncond, Sampling(cfg_scale=cfg))


@torch.no_grad()
def teacher(model, tokens: torch.Tensor, classes: torch.Tensor, cfg: float, topk: int):
    """tokens [N, T] -> (features h [N, T, H] float16, top-k probabilities [N, T, K] float16, ids [N, T, K] int16)
    of the zoo GPT `model` at guidance cfg. h_t is the conditional last hidden state that predicts token t."""
    x = torch.cat([model.cls_emb(classes)[:, None], model.tok_emb(tokens[:, :-1])], 1)
    positions = torch.arange(x.shape[1]).expand(x.shape[0], -1)
    h = model.trunk(x, positions, None)
    uncond = model.forward_train(tokens, torch.full_like(classes, model.null_class)) if cfg != 1 else None
    p = to_probs(model.head(h), uncond, Sampling(cfg_scale=cfg))
    top = p.topk(topk, -1)
    return h.half(), top.values.half(), top.indices.short()


def teacher_set(model, tokens: torch.Tensor, classes: torch.Tensor, cfg: float, topk: int, chunk: int, work: Path,
                log=print, tag: str = "train"):
    """`teacher` for every sample, computed in chunks of `chunk` samples saved in `work` (a killed run continues
    where it stopped; the drafter and EAGLE stages share the chunks)."""
    parts = []
    n_chunks = math.ceil(len(tokens) / chunk)
    for i in range(n_chunks):
        path = work / f"teacher_{tag}_cfg{cfg:g}_top{topk}_{i}.pt"
        if not path.is_file():
            sl = slice(i * chunk, (i + 1) * chunk)
            t0 = time.time()
            out = teacher(model, tokens[sl].long(), classes[sl], cfg, topk)
            tmp = path.with_suffix(".tmp")
            torch.save(out, tmp)
            tmp.rename(path)
            log(f"teacher {tag}: chunk {i + 1}/{n_chunks} ({time.time() - t0:.1f} s)")
        parts.append(torch.load(path))
    return [torch.cat(x) for x in zip(*parts)]


def realism(p: torch.Tensor) -> dict[str, float]:
    """p [N, T, V] at the positions the target samples -> flatness figures."""
    top1 = p.max(-1).values
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return {"share_top1_below_5pct": round(float((top1 < 0.05).float().mean()), 4),
            "mean_top1": round(float(top1.mean()), 4), "mean_entropy_nats": round(float(entropy.mean()), 3)}


def overlap(p: torch.Tensor, q: torch.Tensor) -> float:
    """Mean sum_v min(p, q): the exact rule's acceptance probability of one drafted token."""
    return round(float(torch.minimum(p, q).sum(-1).mean()), 4)


def speed(target: GPTAdapter, drafter: GPTAdapter, cfg: float) -> dict[str, float]:
    """Batch 1: the target's step (ms) with guidance cfg, a 5-token verification / one step, and one unguided drafter
    call / one target step (raw forwards on a half-full cache, interleaved rounds)."""
    cond = torch.tensor([0])
    t_step, t_verify = step_costs(target, cond, Sampling(cfg_scale=cfg), 5, rounds=30)
    d_step, _ = step_costs(drafter, cond, Sampling(), 2, rounds=30)
    return {"target_step_ms": round(1e3 * t_step, 3), "verify5_over_step": round(t_verify / t_step, 3),
            "drafter_call_over_target_step": round(d_step / t_step, 4), "cfg": cfg,
            "threads": torch.get_num_threads()}
