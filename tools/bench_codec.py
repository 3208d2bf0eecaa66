"""Time the codec on the messages of a real run: encode, and decode + parse, per message.

Runs a scenario in process (every role's engine, the same messages as the distributed run, through
the codec), keeps every delivered message with its sender and iteration, then times

- ``encode``: ``encode(message.envelope(...), validate=False)``, what the socket shell does to send;
- ``encode (validated)``: ``encode(message.envelope(...))``, the default (the body checked as decode would);
- ``decode+parse``: ``parse(decode(data, expect_run=...))``, what the shell does with every message it receives;

as the total over all messages divided by their number, repeated ``--repeat`` times (the median
is printed), and the same for the largest message type of the run (the grid report for mv37).
It uses only the codec's public API, so the same script measures two versions of the code:

    PYTHONPATH=. python tools/bench_codec.py mv37 --repeat 15
    PYTHONPATH=/path/to/other/checkout python tools/bench_codec.py mv37 --repeat 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter


def capture(scenario: str, topology: str, peers_per_process: int) -> list[tuple[str, int, object]]:
    """(sender, iteration, typed message) of every message delivered in an in-process run."""
    from common.scenario import load_scenario
    from p2pm.local import run_in_process

    seen: list[tuple[str, int, object]] = []

    def trace(now_s, sender, to, iteration, message):
        seen.append((sender, iteration, message))

    run_in_process(load_scenario(scenario), topology=topology, peers_per_process=peers_per_process, trace=trace)
    return seen


def time_per_message(fn, items: list, repeat: int, min_s: float = 0.05) -> float:
    """Median over ``repeat`` runs of the time of ``fn`` per item [s] (each run loops over the items
    as often as needed to last ``min_s``)."""
    loops = 1
    t = time.perf_counter()
    for x in items:
        fn(x)
    once = time.perf_counter() - t
    if once < min_s:
        loops = max(1, int(min_s / max(once, 1e-9)))
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(loops):
            for x in items:
                fn(x)
        samples.append((time.perf_counter() - t) / (loops * len(items)))
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", default="mv37")
    ap.add_argument("--topology", default="relay", choices=("relay", "mesh"))
    ap.add_argument("--peers-per-process", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=9, help="timed runs per figure (the median is printed)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    from common.codec import decode, encode
    from common.protocol import parse

    run_id = "bench"
    seen = capture(args.scenario, args.topology, args.peers_per_process)
    envs = [m.envelope(run_id=run_id, sender=s, iteration=i) for s, i, m in seen]
    wire = [encode(e) for e in envs]
    types = [m.TYPE.value for _, _, m in seen]
    sizes = Counter()
    for t, d in zip(types, wire):
        sizes[t] += len(d)
    largest = max(sizes, key=lambda t: max(len(d) for tt, d in zip(types, wire) if tt == t))
    big_envs = [e for t, e in zip(types, envs) if t == largest]
    big_wire = [d for t, d in zip(types, wire) if t == largest]

    # every message makes the round trip (a check that the figures are about working code)
    for d in wire:
        parse(decode(d, expect_run=run_id))

    def enc(e):
        return encode(e, validate=False)

    def dec(d):
        return parse(decode(d, expect_run=run_id))

    out = {
        "scenario": args.scenario,
        "messages": len(wire),
        "bytes": sum(map(len, wire)),
        "encode_us": 1e6 * time_per_message(enc, envs, args.repeat),
        "encode_validated_us": 1e6 * time_per_message(encode, envs, args.repeat),
        "decode_parse_us": 1e6 * time_per_message(dec, wire, args.repeat),
        "largest_type": largest,
        "largest_count": len(big_wire),
        "largest_bytes": max(map(len, big_wire)),
        "largest_encode_us": 1e6 * time_per_message(enc, big_envs, args.repeat),
        "largest_encode_validated_us": 1e6 * time_per_message(encode, big_envs, args.repeat),
        "largest_decode_parse_us": 1e6 * time_per_message(dec, big_wire, args.repeat),
    }
    print(f"{args.scenario}: {out['messages']} messages, {out['bytes']:,} bytes "
          f"({', '.join(f'{t} {n}' for t, n in sorted(Counter(types).items()))})")
    print(f"  per message: encode {out['encode_us']:.1f} us (validated {out['encode_validated_us']:.1f} us), "
          f"decode+parse {out['decode_parse_us']:.1f} us")
    print(f"  {largest} ({out['largest_count']} x {out['largest_bytes']:,} bytes): encode "
          f"{out['largest_encode_us']:.0f} us (validated {out['largest_encode_validated_us']:.0f} us), "
          f"decode+parse {out['largest_decode_parse_us']:.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
