"""How MAL grows with the draft tree: the zoo's EAGLE head as a chain, as static binary trees of depth 3-5 (14,
30, 62 nodes), a sampled dynamic tree and the optimal static trees of 14-62 nodes for the head's rank acceptance
profile (`specdec.tree.optimal_shape`), lossless (exact rule), over N images in one batch at one CFG scale.
Counts only, untimed: what a tree buys before anyone pays for verifying it. MAL is the pooled committed tokens per
target forward; +- is the standard error of the per-image MAL over the images.

    python experiments/tree_mal.py --cfg 3 --images 16 --threads 2
    python experiments/tree_mal.py --zoo-dir <folder>     # a retrained head beside the target, before adopting it
    python experiments/tree_mal.py --big                  # 126-255-node trees only
    python experiments/tree_mal.py --big --only optimal --images 64
    python experiments/tree_mal.py --only optimal --rule bounded_lantern --rule-params '{"delta": 0.1}'
        # a relaxed tree rule (MAL and the samples' NLL under the target; its bound is the rule's own)
"""
from __future__ import annotations

import argparse
import json
import math

import torch

import specdec
from drafters.eagle import eagle
from specdec import Sampling
from specdec.bench.timing import set_threads
from specdec.devices import use_device
from specdec.metrics import token_nll
from specdec.registry import make_rule

TREES = {"chain k=4": {"k": 4}, "chain k=6": {"k": 6}, "binary-3 (14 nodes)": {"tree": "static:binary-3"},
         "binary-4 (30 nodes)": {"tree": "static:binary-4"}, "binary-5 (62 nodes)": {"tree": "static:binary-5"},
         "dynamic sampled (59 nodes, depth 6, top 4)": {"tree": "dynamic", "k": 6, "top_k": 4, "total_tokens": 59,
                                                        "drafts": "sample"},
         "optimal-14": {"tree": "static:optimal-14"}, "optimal-30": {"tree": "static:optimal-30"},
         "optimal-62": {"tree": "static:optimal-62"}}
BIG_TREES = {"binary-6 (126 nodes)": {"tree": "static:binary-6"}, "binary-7 (254 nodes)": {"tree": "static:binary-7"},
             "dynamic sampled (127 nodes, depth 8, top 6)": {"tree": "dynamic", "k": 8, "top_k": 6,
                                                             "total_tokens": 127, "drafts": "sample"},
             "dynamic sampled (255 nodes, depth 10, top 8)": {"tree": "dynamic", "k": 10, "top_k": 8,
                                                              "total_tokens": 255, "drafts": "sample"},
             "optimal-126": {"tree": "static:optimal-126"}, "optimal-254": {"tree": "static:optimal-254"}}
BIG_ROOM = 256      # cache slots for the big trees' nodes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--zoo-dir", default=None, help="a zoo weights folder (default: the installed zoo)")
    ap.add_argument("--big", action="store_true", help="measure the 126-255-node trees instead")
    ap.add_argument("--only", default="", help="measure only the trees whose name contains this text")
    ap.add_argument("--rule", default="exact", help="the tree rule (registry name; default: the exact rule)")
    ap.add_argument("--rule-params", default="{}", help="its parameters as JSON, e.g. '{\"delta\": 0.1}'")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (counts only: the device changes no figure "
                                                    "beyond rounding)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    set_threads(args.threads)
    trees = BIG_TREES if args.big else TREES
    device = use_device(args.device)
    bundle = specdec.zoo.load(device, directory=args.zoo_dir,
                              draft_room=BIG_ROOM if args.big else specdec.zoo.DRAFT_ROOM)
    cond = (torch.arange(args.images) % 4).to(device)
    rule = make_rule(args.rule, bundle.target, **json.loads(args.rule_params))
    print(f"| EAGLE drafts, {args.rule} {args.rule_params}, CFG {args.cfg:g}, {args.images} images | MAL | +- "
          f"| target forwards / image | NLL under the target |")
    print("|---|---|---|---|---|")
    trees = {name: params for name, params in trees.items() if args.only in name}
    if not trees:
        raise SystemExit(f"no tree name contains {args.only!r}")
    for name, params in trees.items():
        res = specdec.generate(bundle.target, cond, drafter=eagle(bundle.eagle_head, **params), rule=rule,
                               sampling=Sampling(cfg_scale=args.cfg), seed=args.seed, decode=False)
        nll = float(token_nll(bundle.target_gpt, res.tokens, cond).mean())
        per_image = bundle.target.num_tokens / res.stats.forwards_per_row.double()
        se = float(per_image.std() / math.sqrt(args.images))
        print(f"| {name} | {res.stats.mean_accepted_length:.2f} | {se:.2f} | "
              f"{res.stats.target_forwards / args.images:.1f} | {nll:.3f} |", flush=True)


if __name__ == "__main__":
    main()
