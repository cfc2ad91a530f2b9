"""Property fuzz of the gossip decoders: any bytes either decode or raise ``DecodeError``;
a sealed frame of any content is refused with a counted reason, never an exception."""

from __future__ import annotations

import contextlib
import random
import time

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt.base import DecodeError
from crdt.prefix_index import PrefixIndex
from mesh.auth import Authenticator
from mesh.gossip import MeshCore
from mesh.messages import (
    Envelope,
    MemberUpdate,
    NodeInfo,
    Ping,
    Status,
    Sync,
    decode_envelope,
    encode_envelope,
)
from mesh.transport import unpack_frames

KEY = b"wire fuzz key, at least 32 bytes"
_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64),
    st.floats(), st.text(max_size=10), st.binary(max_size=10),
)
_tree = st.recursive(
    _leaf, lambda inner: st.lists(inner, max_size=12) | st.dictionaries(
        st.text(max_size=6) | st.integers(), inner, max_size=5), max_leaves=60)
_VALID = encode_envelope(Envelope(
    NodeInfo("a", "eu", "http://a"), 1, 0, 1, 0,
    Sync((MemberUpdate("a", "eu", "http://a", 1, 0, Status.ALIVE),), {"prefix": {}}),
    (), "b"))


def _packed(obj: object) -> bytes | None:
    try:
        return bytes(msgpack.packb(obj, use_bin_type=True))
    except (TypeError, ValueError, OverflowError):
        return None


@settings(max_examples=200, deadline=None)
@given(obj=_tree, version=st.sampled_from([2, 1, 3]))
def test_envelope_decoder_raises_only_decode_error(obj: object, version: int) -> None:
    for candidate in (obj, [version, *obj] if isinstance(obj, list) else obj):
        data = _packed(candidate)
        if data is None:
            continue
        try:
            env = decode_envelope(data)
        except DecodeError:
            continue
        assert isinstance(env, Envelope)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200), cut=st.integers(0, len(_VALID)),
       flip=st.integers(0, 8 * len(_VALID) - 1))
def test_mutated_envelopes_and_packets_raise_only_decode_error(data: bytes, cut: int,
                                                               flip: int) -> None:
    mutated = bytearray(_VALID)
    mutated[flip // 8] ^= 1 << (flip % 8)
    for candidate in (data, _VALID[:cut], bytes(mutated), _VALID[:cut] + data):
        for decode in (decode_envelope, unpack_frames):
            with contextlib.suppress(DecodeError):
                decode(candidate)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=_tree, counter=st.integers(1, 2**40))
def test_any_sealed_payload_is_refused_or_used_never_raised(payload: object,
                                                            counter: int) -> None:
    core = MeshCore(NodeInfo("b", "eu", "http://b"), 1, {"prefix": PrefixIndex()},
                    keys=[KEY], rng=random.Random(0), now=0.0, wall=time.time)
    auth = Authenticator([KEY])
    frames = []
    data = _packed(payload)
    if data is not None:
        frames.append(auth.seal(data))
    if isinstance(payload, list):  # a well-formed head with a fuzzed tail
        head = [2, "a", "eu", "http://a", 1, 0, counter, int(time.time())]
        for tail in (payload, [1, [counter, "b"], [], "b", *payload]):
            full = _packed(head + tail)
            if full is not None:
                frames.append(auth.seal(full))
    for frame in frames:
        core.receive(frame, 1.0)  # must not raise
        assert core.last_rejection is None or core.last_rejection[0]
    ping = encode_envelope(Envelope(NodeInfo("a", "eu", "http://a"), 1, 0, counter + 2**41,
                                    int(time.time()), Ping(1, "b"), (), "b"))
    core.receive(auth.seal(ping), 2.0)
    assert core.last_rejection is None  # after all that, a good frame still gets through
