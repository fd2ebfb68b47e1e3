"""Peers side by side: transformers' own `generate` and assisted generation against specdec, same weights, one
process, interleaved rounds.

    python experiments/bench_peers.py --out docs/results/peers.jsonl --threads 2

A transformers `LlamaForCausalLM` target (random weights, Llama config, `--dim` x `--layers`, vocabulary 4096) and
a drafter that shares its embeddings, first `--draft-layers` blocks and head (so that it agrees with the target
often enough to be worth verifying). Both libraries decode `--tokens` tokens after a 1-token prompt, batch 1:

  hf generate      model.generate(ids, max_new_tokens=T, min_new_tokens=T)
  hf assisted      the same with assistant_model=drafter, num_assistant_tokens=k, a constant schedule and no
                   confidence cut-off (so both libraries draft exactly k tokens per step)
  specdec AR       specdec.generate(HFCausalAdapter(target), ids)
  specdec exact    specdec.generate(..., drafter=ModelDrafter(HFCausalAdapter(drafter), k))

in interleaved rounds (hf generate, hf assisted, specdec AR, specdec exact, hf generate, ...), greedy (where all
four must emit the same tokens, which is checked) and sampling at temperature 1. Prints ms/token (median, min-max)
and the ratios specdec / transformers; writes one JSON line per (mode, method).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import specdec
from drafters import ModelDrafter
from specdec import Sampling
from specdec.adapters.hf_causal import HFCausalAdapter
from specdec.bench.timing import interleaved_rounds, set_threads


def llama_pair(vocab: int, dim: int, layers: int, draft_layers: int, max_len: int, seed: int = 0):
    """(target, drafter) LlamaForCausalLM; the drafter is the target's embeddings, first blocks, norm and head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def config(n):
        return LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=int(dim * 8 / 3),
                           num_hidden_layers=n, num_attention_heads=dim // 64, num_key_value_heads=dim // 64,
                           max_position_embeddings=max_len, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(seed)
    target = LlamaForCausalLM(config(layers)).eval()
    draft = LlamaForCausalLM(config(draft_layers)).eval()
    state = {k: v for k, v in target.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < draft_layers}
    draft.load_state_dict(state)
    for m in (target, draft):
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = 0
    return target, draft


def hf_generate(target, ids: torch.Tensor, T: int, sample: bool, seed: int, assistant=None, k: int = 4):
    kwargs = dict(max_new_tokens=T, min_new_tokens=T, do_sample=sample, pad_token_id=0)
    if sample:
        kwargs.update(temperature=1.0, top_k=0, top_p=1.0)
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = k
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = assistant
    torch.manual_seed(seed)
    return target.generate(ids, **kwargs)[0, ids.shape[1]:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: the physical cores)")
    ap.add_argument("--modes", default="greedy,sample")
    ap.add_argument("--out", default="docs/results/peers.jsonl")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    threads = set_threads(args.threads)
    T, k = args.tokens, args.k
    target, draft = llama_pair(args.vocab, args.dim, args.layers, args.draft_layers, T + 64)
    ids = torch.tensor([[0]])
    grid = (T,)
    ad_target = HFCausalAdapter(target, torch.arange(args.vocab), grid=grid)
    ad_draft = HFCausalAdapter(draft, torch.arange(args.vocab), grid=grid)
    params = sum(p.numel() for p in target.parameters()), sum(p.numel() for p in draft.parameters())
    setup = dict(target_params=params[0], drafter_params=params[1], tokens=T, k=k, batch=1, threads=threads,
                 device="cpu", dtype="float32", torch=torch.__version__, machine=platform.processor() or
                 platform.machine(), date=time.strftime("%Y-%m-%d"))
    print(f"target {params[0] / 1e6:.1f}M, drafter {params[1] / 1e6:.1f}M params; {T} tokens, k={k}, batch 1, "
          f"{threads} threads, {args.rounds} interleaved rounds")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = ["hf generate", "hf assisted", "specdec AR", "specdec exact"]
    for mode in args.modes.split(","):
        sample = mode == "sample"
        sampling = Sampling(temperature=1.0 if sample else 0.0)
        methods = [
            lambda: hf_generate(target, ids, T, sample, 0),
            lambda: hf_generate(target, ids, T, sample, 0, assistant=draft, k=k),
            lambda: specdec.generate(ad_target, ids, sampling=sampling, seed=0),
            lambda: specdec.generate(ad_target, ids, drafter=ModelDrafter(ad_draft, k=k), sampling=sampling,
                                     seed=0),
        ]
        for m in methods:            # warm-up
            m()
        timings, last = interleaved_rounds(methods, args.rounds)
        tokens = [last[0], last[1], last[2].tokens[0], last[3].tokens[0]]
        if not sample:
            same = all(torch.equal(tokens[0], t) for t in tokens[1:])
            print(f"greedy: all four emit the same {T} tokens: {same}")
            if not same:
                raise SystemExit("greedy outputs differ between the libraries: the comparison is void")
        mal = last[3].stats.mean_accepted_length
        with out.open("a") as f:
            for name, t in zip(names, timings):
                row = dict(setup, mode=mode, method=name, ms_per_token=1e3 * t.median / T,
                           ms_per_token_min=1e3 * t.min / T, ms_per_token_max=1e3 * t.max / T, spread=t.spread,
                           mean_accepted_length=mal if name == "specdec exact" else None)
                f.write(json.dumps(row) + "\n")
                print(f"{mode:7s} {name:14s} {row['ms_per_token']:7.3f} ms/token "
                      f"({row['ms_per_token_min']:.3f}-{row['ms_per_token_max']:.3f})")
        print(f"{mode:7s} specdec AR / hf generate = {timings[2].median / timings[0].median:.3f}x time; "
              f"specdec exact / hf assisted = {timings[3].median / timings[1].median:.3f}x time "
              f"(specdec MAL {mal:.2f})")


if __name__ == "__main__":
    main()
