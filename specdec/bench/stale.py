"""Rows measured with other weights than the installed ones.

Every bench row names the weights it was measured with (`weights`: card name -> sha256 prefix). After a retraining,
rows of a results file describe the old weights while the README and the demo use the new ones; a results file is
only honest when its figures and the installed weights agree. A row is stale when a card that its configuration
used changed: the generator's own cards (target, tokenizer, feature net) always, a drafter's card only for the rows
that drafted with it (a retrained EAGLE head does not make the AR or Jacobi rows stale). Rows from before `weights`
was recorded cannot be checked and are left alone.
"""
from __future__ import annotations

from pathlib import Path

# drafter registry name -> the zoo cards holding its weights; cards listed here belong to their drafters only
DRAFTER_CARDS = {"model": ("drafter", "video_drafter"), "model_tree": ("drafter", "video_drafter"),
                 "model_tree_dynamic": ("drafter", "video_drafter"), "eagle": ("eagle",)}
_DRAFTER_ONLY = {card for cards in DRAFTER_CARDS.values() for card in cards}


def card_weights(cards: dict[str, dict]) -> dict[str, str]:
    """card name -> its weights' sha256 prefix (12 hex digits): what a row's `weights` holds and what it is checked
    against."""
    return {name: str(card.get("sha256", ""))[:12] for name, card in cards.items()}


def installed_weights(directory: Path | None = None) -> dict[str, str]:
    """`card_weights` of every zoo card installed (image, video and continuous zoos share the folder); {} when there
    is none."""
    from specdec.zoo import read_card, weights_dir

    folder = Path(directory) if directory is not None else weights_dir()
    return card_weights({path.stem: read_card(path.stem, folder) for path in sorted(folder.glob("*.json"))})


def changed_weights(row: dict, installed: dict[str, str]) -> dict[str, tuple[str, str]]:
    """The cards this row used whose installed weights differ from the ones it names: card -> (row's, installed);
    a card no longer installed counts as changed ("" installed)."""
    named = row.get("weights") or {}
    mine = set(DRAFTER_CARDS.get(row.get("drafter") or "", ()))
    return {card: (sha, installed.get(card, "")) for card, sha in named.items()
            if (card not in _DRAFTER_ONLY or card in mine) and sha and installed.get(card, "") != sha}


def stale_note(rows: list[dict], installed: dict[str, str]) -> str | None:
    """One paragraph naming the stale rows' labels and the changed cards, with the command that measures them
    again; None when every checkable row agrees with the installed weights."""
    stale = [(r, changed_weights(r, installed)) for r in rows]
    stale = [(r, c) for r, c in stale if c]
    if not stale:
        return None
    cards = sorted({f"{card} {old} -> {new or 'gone'}" for _, c in stale for card, (old, new) in c.items()})
    labels = sorted({r.get("label", "?") for r, _ in stale})
    return (f"note: {len(stale)} rows were measured with other weights than the installed ones ({'; '.join(cards)}): "
            f"{', '.join(labels)}. Their figures describe the old weights; measure them again with --redo "
            f"PATTERN (e.g. --redo '{labels[0]}').")
