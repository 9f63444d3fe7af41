"""Cost of IntraSlice's FFN step with and without its iterative step (a thin wrapper over
``harness.session.RunSession``): wall time of the FFN component and its share of the
layer loop, at a uniform FFN-only ratio (attention kept), no evaluation.

    python scripts/bench_ffn.py [--ncal 16 --seqlen 256 --ratio 0.3]
"""

from __future__ import annotations

import argparse
import sys

from prunebench.harness.session import RunSession
from prunebench.harness.spec import RunSpec


def main() -> int:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--model", default="smollm2-135m")
    cli.add_argument("--ncal", type=int, default=16, help="calibration sequences")
    cli.add_argument("--seqlen", type=int, default=256, help="calibration sequence length")
    cli.add_argument("--ratio", type=float, default=0.3, help="FFN ratio of every layer")
    args = cli.parse_args()
    base = ["attention=keep", "ffn=intraslice-iterpca", "allocation.attention=0", f"allocation.ffn={args.ratio}"]
    for label, iterate in (("without iterative step", "false"), ("with iterative step", "true")):
        spec = RunSpec(model=args.model, method="wanda-sp", sparsity=args.ratio, overrides=[*base, f"ffn.iterate={iterate}"],
                       profile="ci", profile_overrides={"calibration_samples": args.ncal, "calibration_seqlen": args.seqlen},
                       metrics=[], zeroshot=False, timing=False)
        result = RunSession(spec, show_progress=False).run().to_dict()
        ffn = sum(note["ffn"]["seconds"] for note in result["pruning"]["layers"] if "ffn" in note)
        loop = result["timings"]["stages_s"]["prune.layer_loop"]
        print(f"{label:24s} FFN component {ffn:7.1f} s   layer loop {loop:7.1f} s   FFN share {100 * ffn / loop:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
