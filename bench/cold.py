"""The cold memo's reading of new nodes, part by part (`python -m bench.cold`): what a first scoped call spends.

Each round reads the same 30k nodes as fresh bytes objects (as a first call meets them), through
`SynczMemo().facts` and through each step of `wire._nodes_facts` in turn, and through the alternatives measured in
docs/benchmarks.md ("Item 1, round 3"), all alternated in one process; CPU ms, median / best.
`--entries N` adds N metadata entries (and a LABELS Struct) to every node: istiod's syncz node carries only the id,
CLUSTER_ID, NAMESPACE and ISTIO_VERSION (pilot/pkg/xds/statusgen.go, 1.30.3), ~100 bytes as the simulator's; larger
nodes (another control plane's, a hostile replica's) show how each part scales with the bytes.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from collections.abc import Callable
from itertools import repeat
from operator import add, attrgetter, itemgetter, le, methodcaller
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, struct_pb2

from istioctl_proxy import wire
from istioctl_proxy.sim.simulator import make_mesh


def _nodes(k: int, p: int, entries: int) -> list[bytes]:
    nodes = [n for r in make_mesh(k, p) for n in wire.syncz_split(r.syncz(""), wire.SynczMemo()).nodes]
    if not entries:
        return nodes
    extra = struct_pb2.Struct()
    for i in range(entries):
        extra.fields[f"ISTIO_META_ENTRY_{i:02d}"].string_value = f"value-{i:02d}-" + "x" * 24
    extra.fields["LABELS"].struct_value.update({f"label-{i}": f"v{i}" for i in range(6)})
    # Metadata's fields merge: a second metadata field adds these entries to each node's own.
    more = b"\x1a" + wire._varint_bytes(len(raw := extra.SerializeToString())) + raw
    return [n + more for n in nodes]


def _id_ends(nodes: list[bytes]) -> list[int]:
    """_istiod_facts's checks: each node starts with its id field, of a one-byte length, inside the node."""
    assert min(map(len, nodes)) >= 2 and b"".join(map(itemgetter(slice(1)), nodes)) == b"\n" * len(nodes)
    id_ends = list(map(add, map(itemgetter(1), nodes), repeat(2)))
    assert max(id_ends) < 0x82 and all(map(le, id_ends, map(len, nodes)))
    return id_ends


def _interleaved(nodes: list[bytes]) -> list[bytes]:
    """Frames and nodes in one list: the join copies each node once (the pairs _framed joins are copies already)."""
    parts = [b""] * (2 * len(nodes))
    parts[::2] = map(wire._NODE_FRAMES.__getitem__, map(len, nodes))
    parts[1::2] = nodes
    return parts


def _map_bytes_list() -> Any:
    """The lighter schema measured in round 3: nodes seen as metadata only, a map from key to the Value's bytes."""
    name = "istioctl_proxy/bench_cold_1.proto"
    pool = descriptor_pool.Default()
    try:
        file = pool.FindFileByName(name)
    except KeyError:
        f = descriptor_pb2.FieldDescriptorProto
        proto = descriptor_pb2.FileDescriptorProto(name=name, package="istioctl_proxy.bench_cold_1", syntax="proto3")
        meta = proto.message_type.add(name="MetaNs")
        meta.field.add(name="fields", number=1, label=f.LABEL_REPEATED, type=f.TYPE_MESSAGE,
                       type_name=".istioctl_proxy.bench_cold_1.MetaNs.FieldsEntry")
        entry = meta.nested_type.add(name="FieldsEntry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, label=f.LABEL_OPTIONAL, type=f.TYPE_STRING)
        entry.field.add(name="value", number=2, label=f.LABEL_OPTIONAL, type=f.TYPE_BYTES)
        node = proto.message_type.add(name="NodeNs")
        node.field.add(name="metadata", number=3, label=f.LABEL_OPTIONAL, type=f.TYPE_MESSAGE,
                       type_name=".istioctl_proxy.bench_cold_1.MetaNs")
        listing = proto.message_type.add(name="NodeNsList")
        listing.field.add(name="nodes", number=1, label=f.LABEL_REPEATED, type=f.TYPE_MESSAGE,
                          type_name=".istioctl_proxy.bench_cold_1.NodeNs")
        pool.Add(proto)
        file = pool.FindFileByName(name)
    return message_factory.GetMessageClass(file.message_types_by_name["NodeNsList"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--proxies", type=int, default=30_000)
    parser.add_argument("--entries", type=int, default=0)
    parser.add_argument("--baseline", default="main", help="git revision whose wire.py alternates with this one ('')")
    args = parser.parse_args()
    old: Any = None
    if args.baseline:
        from bench.run import _merge_at

        old = _merge_at(args.baseline).wire
    nodes = _nodes(5, args.proxies, args.entries)
    lite, light = wire._LITE, _map_bytes_list()
    pattern = re.compile(rb"\n\tNAMESPACE\x12[\x02-\x7f]\x1a([\x00-\x7d])")
    meta_fields, get_ns, get_bytes = attrgetter("metadata.fields"), methodcaller("get", "NAMESPACE"), \
        methodcaller("get", "NAMESPACE", b"")

    def ns_listcomp(listed: Any) -> list[str]:  # what _nodes_facts does
        return [v.string_value if (v := d.metadata.fields.get("NAMESPACE")) is not None else "" for d in listed.nodes]

    steps: dict[str, Callable[[dict[str, Any]], Any]] = {
        "memo.facts (all of it)": lambda s: wire.SynczMemo().facts(s["nodes"]),
        "_nodes_facts": lambda s: wire._nodes_facts(s["nodes"]),
        "  bytes path: checks (first bytes, id lengths)": lambda s: s.__setitem__("id_ends", _id_ends(s["nodes"])),
        "  bytes path: ids (C slices, decoded)": lambda s: s.__setitem__("ids", list(map(bytes.decode, map(
            bytes.__getitem__, s["nodes"], map(slice, repeat(2), s["id_ends"]))))),
        "  bytes path: tails, distinct ones": lambda s: s.__setitem__("tails", list(map(
            bytes.__getitem__, s["nodes"], map(slice, s["id_ends"], repeat(None))))) or s.__setitem__(
            "distinct", list(dict.fromkeys(s["tails"]))),
        "  bytes path: distinct tails' namespaces": lambda s: s.__setitem__("table", dict(zip(
            s["distinct"], wire._namespaces(s["distinct"]), strict=True))),
        "  bytes path: (id, namespace) tuples": lambda s: list(zip(s["ids"], map(s["table"].__getitem__, s["tails"]),
                                                                  strict=True)),
        "  node-list path (other nodes; main's): framing": lambda s: s.__setitem__(
            "framed", wire._framed(s["nodes"])),
        "  node-list path: NodeList parse (full Nodes)": lambda s: s.__setitem__(
            "listed", lite.node_list.FromString(s["framed"])),
        "  node-list path: NodeListIds parse + ids": lambda s: list(lite.node_list_ids.FromString(s["framed"]).node.id),
        "  node-list path: first-byte check": lambda s: b"".join(map(itemgetter(slice(1)), s["nodes"]))
        == b"\n" * len(s["nodes"]),
        "  node-list path: NAMESPACE read (wrappers)": lambda s: s.__setitem__("ns", ns_listcomp(s["listed"])),
        "  node-list path: tuples": lambda s: list(zip(s["ns"], s["ns"], strict=True)),
        "alt: framing interleaved (one copy)": lambda s: b"".join(_interleaved(s["nodes"])),
        "alt: ids from the node bytes (C slices)": lambda s: list(map(bytes.decode, map(
            bytes.__getitem__, s["nodes"], map(slice, repeat(2), map(add, map(itemgetter(1), s["nodes"]),
                                                                     repeat(2)))))),
        "alt: map<string,bytes> parse": lambda s: s.__setitem__("light", light.FromString(s["framed"])),
        "alt: map<string,bytes> read": lambda s: list(map(get_bytes, map(meta_fields, s["light"].nodes))),
        "alt: C chain on NodeList": lambda s: list(map(get_ns, map(meta_fields, s["listed"].nodes))),
        "alt: regex proposal (no proof)": lambda s: pattern.findall(s["framed"]),
        "alt: text format of NodeList": lambda s: str(s["listed"]) if not args.entries else "",
        "alt: 2nd light parse + ==": lambda s: light.FromString(s["framed"]) == s["light"],
    }
    if old is not None:
        steps = {"memo.facts (baseline)": lambda s: old.SynczMemo().facts(s["nodes"]),
                 "_nodes_facts (baseline)": lambda s: old._nodes_facts(s["nodes"]), **steps}
    times: dict[str, list[float]] = {name: [] for name in steps}
    heads = [name for name in steps if name.startswith(("memo.facts", "_nodes_facts"))]
    for r in range(args.rounds):
        state: dict[str, Any] = {}
        # The whole readings alternated (this code first in even rounds, the baseline first in odd ones), then the
        # parts in order (each uses the one before).
        for name in (heads if r % 2 else heads[::-1]) + [n for n in steps if n not in heads]:
            step = steps[name]
            if name[0] != " " or "checks" in name or "framing" in name:  # fresh bytes, as a first call's
                state["nodes"] = [bytes(bytearray(n)) for n in nodes]
            t = time.process_time()
            step(state)
            times[name].append(time.process_time() - t)
    if old is not None:
        assert old._nodes_facts(nodes) == wire._nodes_facts(nodes)
    print(f"{len(nodes)} nodes, {sum(map(len, nodes)) / len(nodes):.0f} bytes each, load {os.getloadavg()[0]:.1f}")
    for name, ts in times.items():
        print(f"{name:48s} {statistics.median(ts) * 1e3:7.1f} ms median {min(ts) * 1e3:7.1f} best")


if __name__ == "__main__":
    main()
