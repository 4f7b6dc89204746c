"""Convert a checkpoint released with the BPR paper (chenhang98/BPR, mmsegmentation format,
HRNet-18s) into a bpr checkpoint, so those weights run in this pipeline at scale.

    bpr import-official CKPT.pth OUT.pt [--name NAME] [--patch-size 64]
    python -m jobs.import_official CKPT.pth OUT.pt

Every key is mapped onto our `hrnet18s` and every shape checked (bpr_core.official); a file that
is not an official HRNet-18s is refused naming the keys that do not fit. The converted model
uses the paper's reassembly (no do-no-harm rules); `bpr calibrate` can add them for your data.
The file is read with torch.load(weights_only=True): nothing is unpickled.
"""

from __future__ import annotations

import argparse
import sys

from bpr_core.formats import InputError

from ._cli import prog_name, run_main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=prog_name("import_official"), description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="official checkpoint (.pth), e.g. from the BPR release page")
    ap.add_argument("out", help="bpr checkpoint to write (.pt)")
    ap.add_argument("--name", help="model name in the card (default: bpr-official-<file stem>)")
    ap.add_argument("--patch-size", type=int, default=64, help="patch size the model was trained with (default 64, the release's)")
    args = ap.parse_args(argv)
    from bpr_core.official import import_official

    try:
        card = import_official(args.checkpoint, args.out, name=args.name, patch_size=args.patch_size)
    except FileNotFoundError:
        raise InputError(f"checkpoint not found: {args.checkpoint}") from None
    except ValueError as e:
        raise InputError(str(e)) from None
    print(f"wrote {args.out}: {card['name']} (source sha256 {card['source_sha256'][:16]}...)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main)
