"""What a draft tree costs besides the target's forward: building its inputs and attention mask, and committing the
accepted path, as a share of one tree verification step, on the zoo target at batch 1 (cache half full).

Times, per tree shape, in interleaved rounds (median): the tree's inputs (`specdec.tree.verify_inputs`: tokens,
positions, slots, ancestor table) and its cache mask (`StaticKVCache.tree_mask`), the whole verification forward
(`forward_tree`, which includes both), the path commit (`commit_tree`: K/V moves), and a plain 1-token step.

    python experiments/bench_tree_overhead.py --threads 1 --cfg 3
"""
from __future__ import annotations

import argparse
import statistics

import torch

import specdec
from specdec import Sampling
from specdec.bench.timing import interleaved_rounds, set_threads
from specdec.tree import DraftTree, shape_parents, static_shape, verify_inputs


def tree_of(shape: str, vocab: int) -> DraftTree:
    parents, ranks, depths = shape_parents(static_shape(shape))
    N = len(parents)
    g = torch.Generator().manual_seed(0)
    return DraftTree(torch.randint(vocab, (1, N), generator=g), torch.tensor([parents]), torch.tensor([N]), None,
                     max(depths), max(ranks) + 1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--shapes", default="chain-4,binary-3,binary-4")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    threads = set_threads(args.threads)
    target = specdec.zoo.load().target
    sampling = Sampling(cfg_scale=args.cfg)
    print(f"zoo target, batch 1, cfg {args.cfg:g}, {threads} threads (median of {args.rounds} interleaved rounds)")
    for shape in args.shapes.split(","):
        tree = tree_of(shape, target.vocab_size)
        N = tree.size
        state, _ = target.start(torch.tensor([1]), sampling, target.num_tokens + N + 1)
        target.forward(state, torch.zeros(1, 70, dtype=torch.long))
        base = state.cache.lengths.clone()
        n_done, last = torch.tensor([71]), torch.tensor([0])
        path = torch.full((1, tree.max_depth), -1)
        path[0, 0] = 0

        def reset():
            state.cache.set_lengths(base)

        def inputs():
            slot0 = state.cache.lengths[:1]
            _, _, _, allowed = verify_inputs(tree, n_done, last, slot0)
            state.cache.tree_mask(slot0, state.double(allowed))

        def verify():
            reset()
            target.forward_tree(state, tree, last, n_done)

        def commit():
            target.commit_tree(state, tree, path)

        def step():
            reset()
            target.forward(state, last[:, None])

        for _ in range(5):
            for fn in (inputs, verify, commit, step):
                fn()
        timings, _ = interleaved_rounds([inputs, verify, commit, step], args.rounds)
        t_in, t_verify, t_commit, t_step = (1e3 * statistics.median(t.seconds) for t in timings)
        share = (t_in + t_commit) / (t_verify + t_commit)
        print(f"{shape:>9} ({N:2d} nodes): inputs+mask {t_in:.3f} ms, verify {t_verify:.3f} ms (= "
              f"{t_verify / t_step:.2f} steps), commit {t_commit:.3f} ms; tree overhead {100 * share:.1f} % of the "
              f"verification step; 1-token step {t_step:.3f} ms")


if __name__ == "__main__":
    main()
