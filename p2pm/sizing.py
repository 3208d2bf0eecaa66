"""Checks made before a run starts: the largest message of a distributed run must fit the codec's
limit (``common.protocol.MAX_MESSAGE_BYTES``, 16 MiB).

In the full P2P market a peer process receives, in every ROUND, and sends, in its RESULT, values for
every trade its peers own (producers x consumers pairs, each with one value per hour; 8 bytes per
float64), with about two arrays per trade (measured on the wire: 1.5). The estimate below takes
two, so that a run that passes the check does not hit the limit halfway.
"""

from __future__ import annotations

from common.protocol import MAX_MESSAGE_BYTES

BYTES_PER_VALUE = 8
ARRAYS_PER_TRADE = 2
OVERHEAD_BYTES = 64 * 1024


def largest_host_message_bytes(n_producers: int, n_consumers: int, hours: int, peers_per_process: int) -> int:
    """Estimated bytes of the largest ROUND/RESULT of one peer process hosting ``peers_per_process``
    peers of the side with more partners."""
    partners = max(n_producers, n_consumers)
    return peers_per_process * partners * hours * BYTES_PER_VALUE * ARRAYS_PER_TRADE + OVERHEAD_BYTES


def max_peers_per_process(n_producers: int, n_consumers: int, hours: int, limit: int = MAX_MESSAGE_BYTES) -> int:
    per_peer = max(n_producers, n_consumers) * hours * BYTES_PER_VALUE * ARRAYS_PER_TRADE
    return max(1, (limit - OVERHEAD_BYTES) // max(per_peer, 1))


def check_message_size(scenario, peers_per_process: int, limit: int = MAX_MESSAGE_BYTES) -> str | None:
    """None when the run's messages fit the limit, else a one-line reason with the way out."""
    if scenario.market.kind != "p2p":
        return None
    from common.models import PRODUCER_KINDS

    producers = sum(p.kind in PRODUCER_KINDS for p in scenario.peers)
    consumers = len(scenario.peers) - producers
    est = largest_host_message_bytes(producers, consumers, scenario.market.hours, peers_per_process)
    if est <= limit:
        return None
    ok = max_peers_per_process(producers, consumers, scenario.market.hours, limit)
    return (f"peers_per_process {peers_per_process}: a peer process's ROUND and RESULT would carry about "
            f"{est / 2**20:.1f} MiB ({peers_per_process} peers x up to {max(producers, consumers)} trades x "
            f"{scenario.market.hours} h), over the {limit / 2**20:.0f} MiB message limit; use at most {ok} peers per "
            f"process for {scenario.name}")
