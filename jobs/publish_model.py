"""Publish a checkpoint as the shipped model: its weights and config unchanged, with a model card
(a JSON file: data, commands, hardware, figures) embedded, and the card written beside it as
model_card.json, so `Refiner()` and `jobs.refine` without --checkpoint use it.

    python -m jobs.publish_model data/cal2/calibrated.pt card.json [--out bpr_core/weights/default.pt]

The last step of the shipped model's rebuild (its card's `rebuild`). Publishing the shipped model
with its own card writes the same weights, config and card again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bpr_core.formats import InputError

from ._cli import prog_name, run_main


def publish(checkpoint: str, card_file: str, out: str) -> dict:
    """Write `out` (weights and config of `checkpoint`, the card of `card_file`) and `out`'s
    directory's model_card.json; returns the card."""
    from bpr_core.refiner import load_checkpoint, save_checkpoint

    try:
        card = json.loads(Path(card_file).read_text())
        loaded = load_checkpoint(checkpoint)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot publish: {e}") from None
    if not isinstance(card, dict) or not card.get("name"):
        raise InputError(f"model card {card_file} is not a JSON object with a name")
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    save_checkpoint(tmp, loaded.model, loaded.config, card)
    tmp.replace(out_path)
    (out_path.parent / "model_card.json").write_text(json.dumps(card, indent=2))
    return card


def main(argv: list[str] | None = None) -> int:
    from bpr_core.refiner import DEFAULT_WEIGHTS

    ap = argparse.ArgumentParser(prog=prog_name("publish_model"), description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="bpr checkpoint to publish (e.g. jobs.calibrate --write's)")
    ap.add_argument("card", help="model card, a JSON object (the shipped one: bpr_core/weights/model_card.json)")
    ap.add_argument("--out", default=str(DEFAULT_WEIGHTS), help=f"checkpoint to write (default: the shipped model, {DEFAULT_WEIGHTS})")
    args = ap.parse_args(argv)
    card = publish(args.checkpoint, args.card, args.out)
    print(f"wrote {args.out} ({card['name']} {card.get('version', '')}) and its model_card.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
