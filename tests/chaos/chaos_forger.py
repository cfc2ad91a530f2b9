"""A peer without the mesh key: run inside a container of the kvmesh image, it sends forged
gossip to routers and prints what they answered as one JSON line.

The forged envelope is the most harmful one an outsider could write: a push whose prefix
delta claims a replica holds 64 blocks at a version far ahead of the real one, and a
membership update declaring a live router DEAD at an incarnation it never reached. It is
well-formed (checked by decoding it here) and sent three ways: sealed with a key of its
own, with the real key's id in front of a made-up tag, and unsigned; plus one packet that
is not a packet at all.

    python3 chaos_forger.py CONFIG_JSON
    CONFIG_JSON: {"targets": [url...], "key_id": hex, "replica": url,
                  "victim": {"id", "region", "address", "generation"}}
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from crdt.prefix_index import PrefixIndex
from mesh.auth import MAGIC, Authenticator
from mesh.messages import (
    Envelope,
    MemberUpdate,
    NodeInfo,
    Push,
    Status,
    decode_envelope,
    encode_envelope,
)
from mesh.transport import CONTENT_TYPE, GOSSIP_PATH, REJECTED_HEADER, pack_frames, unpack_frames

FORGED_EPOCH = (1 << 62) - 1
FORGED_SEQ = 10**9


def forged_payload(config: dict[str, Any]) -> bytes:
    replica = config["replica"]
    index = PrefixIndex()
    index.reset(replica, FORGED_EPOCH)
    index.store(replica, (FORGED_EPOCH, FORGED_SEQ), list(range(1, 65)))
    push = Push(
        seq=1,
        deltas={"prefix": index.delta_since({}, 0.0).to_wire()},
        digests={"prefix": {replica: (FORGED_EPOCH, FORGED_SEQ)}},
    )
    v = config["victim"]
    dead = MemberUpdate(v["id"], v["region"], v["address"], v["generation"], 10**6, Status.DEAD)
    now = time.time()
    envelope = Envelope(
        sender=NodeInfo("forger-1", v["region"], "http://forger-1:8999"),
        generation=int(now * 1000),
        incarnation=0,
        counter=1,
        sent_at=int(now),
        body=push,
        updates=(dead,),
    )
    payload = encode_envelope(envelope)
    decoded = decode_envelope(payload)  # well-formed: only the signature is wrong
    assert decoded.sender.node_id == "forger-1" and isinstance(decoded.body, Push)
    return payload


def post(url: str, body: bytes) -> dict[str, Any]:
    request = urllib.request.Request(
        url + GOSSIP_PATH, data=body, method="POST", headers={"content-type": CONTENT_TYPE}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            answer = resp.read()
            return {
                "status": resp.status,
                "rejected": resp.headers.get(REJECTED_HEADER, ""),
                "answer_frames": len(unpack_frames(answer)) if answer else 0,
            }
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "rejected": "", "answer_frames": 0}


def main(argv: list[str]) -> int:
    config = json.loads(argv[1])
    payload = forged_payload(config)
    frames = {
        "own_key": Authenticator([os.urandom(32)]).seal(payload),
        "forged_tag": MAGIC + bytes.fromhex(config["key_id"]) + os.urandom(32) + payload,
        "unsigned": payload,
    }
    results: dict[str, dict[str, Any]] = {}
    for target in config["targets"]:
        for name, frame in frames.items():
            results[f"{target} {name}"] = post(target, pack_frames([frame]))
        results[f"{target} garbage"] = post(target, b"\xc1 not a packet")
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
