"""The `distill bench` verb."""

from __future__ import annotations


def add_parser(sub) -> None:
    """Add `distill bench [--quick] [--gpu] [--out FILE.json]`."""
    parser = sub.add_parser("bench", help="run the benchmark suite: ratios measured side by side")
    parser.add_argument("--quick", action="store_true", help="smaller sizes; finishes in under 10 minutes here")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU figures instead (bf16 training tokens/s and MFU, cache vs forward); needs a GPU")
    parser.add_argument("--out", help="write the results as JSON to this file")
    parser.set_defaults(func=lambda args: _run(args))


def _run(args) -> int:
    from bench.suite import main

    return main(args.quick, args.out, gpu=args.gpu)
