"""Pickles written opcode by opcode, for the hostile corpus (tests/hostile.py) and the fuzzers (tests/test_fuzz.py).

:class:`Ops` writes a protocol-2 pickle one opcode at a time: what ``pickle`` would refuse to produce (10**5 levels of
nesting, shared and self references, calls of any global) is just a longer byte string here. The helpers below
build such fragments; :func:`splice` puts one into a pickle torch.save wrote, in place of :data:`PLACEHOLDER`.

Pickle opcodes used are the ones torch's ``weights_only`` unpickler understands (protocol 2).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

PLACEHOLDER = "__lexport_hostile_placeholder__"

class Ops:
    """A protocol-2 pickle written opcode by opcode (what ``pickle`` would refuse to produce, e.g. 10**5 levels of
    nesting, is just a longer byte string here). Memo indices are handed out by :meth:`put`, starting at
    ``memo_base`` so a fragment can be spliced into a pickle that uses lower indices."""

    def __init__(self, memo_base: int = 0, proto: bool = False) -> None:
        self.b = bytearray(b"\x80\x02" if proto else b"")
        self.memo = memo_base

    # values
    def int(self, n: int) -> Ops:
        if 0 <= n < 256:
            self.b += b"K" + bytes([n])
        elif 0 <= n < 65536:
            self.b += b"M" + struct.pack("<H", n)
        elif -(2**31) <= n < 2**31:
            self.b += b"J" + struct.pack("<i", n)
        else:  # LONG1: little-endian two's complement
            nbytes = (n.bit_length() + 8) // 8
            data = n.to_bytes(nbytes, "little", signed=True)
            if len(data) > 255:
                raise ValueError("integer too large for LONG1")
            self.b += b"\x8a" + bytes([len(data)]) + data
        return self

    def float(self, x: float) -> Ops:
        self.b += b"G" + struct.pack(">d", x)
        return self

    def str(self, s: str) -> Ops:
        data = s.encode("utf-8", "surrogatepass")
        self.b += b"X" + struct.pack("<I", len(data)) + data
        return self

    def bytes_(self, data: bytes) -> Ops:  # SHORT_BINSTRING (decoded as a str by torch, encoding latin1)
        self.b += b"U" + bytes([len(data)]) + data
        return self

    def none(self) -> Ops:
        self.b += b"N"
        return self

    def bool(self, v: bool) -> Ops:
        self.b += b"\x88" if v else b"\x89"
        return self

    # containers
    def mark(self) -> Ops:
        self.b += b"("
        return self

    def empty_list(self) -> Ops:
        self.b += b"]"
        return self

    def empty_dict(self) -> Ops:
        self.b += b"}"
        return self

    def empty_tuple(self) -> Ops:
        self.b += b")"
        return self

    def tuple(self) -> Ops:  # MARK ... TUPLE
        self.b += b"t"
        return self

    def append(self) -> Ops:
        self.b += b"a"
        return self

    def appends(self) -> Ops:  # MARK ... APPENDS
        self.b += b"e"
        return self

    def setitem(self) -> Ops:
        self.b += b"s"
        return self

    def setitems(self) -> Ops:  # MARK ... SETITEMS
        self.b += b"u"
        return self

    def pop(self) -> Ops:
        self.b += b"0"
        return self

    # memo
    def put(self) -> int:
        idx = self.memo
        self.memo += 1
        self.b += b"r" + struct.pack("<I", idx)
        return idx

    def get(self, idx: int) -> Ops:
        self.b += b"j" + struct.pack("<I", idx)
        return self

    # calls
    def global_(self, module: str, name: str) -> Ops:
        self.b += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        return self

    def reduce(self) -> Ops:
        self.b += b"R"
        return self

    def build(self) -> Ops:
        self.b += b"b"
        return self

    def binpersid(self) -> Ops:
        self.b += b"Q"
        return self

    def stop(self) -> bytes:
        self.b += b"."
        return bytes(self.b)

    def extend(self, raw: bytes) -> Ops:
        self.b += raw
        return self

    # torch building blocks
    def ordered_dict(self) -> Ops:
        """Push an empty collections.OrderedDict (fill it with MARK ... SETITEMS)."""
        return self.global_("collections", "OrderedDict").empty_tuple().reduce()

    def tensor(self, key: str, storage_type: str, numel: int, offset: int, size: Iterable[int],
               stride: Iterable[int], requires_grad: bool = False) -> Ops:
        """Push torch._utils._rebuild_tensor_v2(storage `key`, offset, size, stride, requires_grad, OrderedDict())."""
        self.global_("torch._utils", "_rebuild_tensor_v2").mark()
        self.mark().str("storage").global_("torch", storage_type).str(key).str("cpu").int(numel).tuple()
        self.binpersid().int(offset)
        self.mark()
        for d in size:
            self.int(d)
        self.tuple().mark()
        for s in stride:
            self.int(s)
        self.tuple().bool(requires_grad).ordered_dict().tuple().reduce()
        return self


def nested_lists(depth: int) -> bytes:
    """Opcodes pushing [[[...]]] `depth` levels deep without recursion: `depth` EMPTY_LISTs, then APPENDs."""
    return b"]" * depth + b"a" * (depth - 1)


def nested_dicts(depth: int) -> bytes:
    """{"k": {"k": ...}} `depth` levels deep: EMPTY_DICT + key per level, then SETITEM per level."""
    key = b"X" + struct.pack("<I", 1) + b"k"
    return (b"}" + key) * (depth - 1) + b"}" + b"s" * (depth - 1)


def shared_refs(levels: int, memo_base: int = 1_000_000) -> bytes:
    """x = []; x = [x, x] `levels` times: a few bytes per level, 2**levels paths through it. Written without POP
    (which torch's unpickler does not know): every list is pushed with a MARK first, then filled innermost first."""
    o = Ops(memo_base)
    for _ in range(levels):
        o.empty_list().mark()
    o.empty_list()
    for _ in range(levels):
        prev = o.put()
        o.get(prev).appends()
    return bytes(o.b)


def self_referencing_list(memo_base: int = 1_000_000) -> bytes:
    """l = []; l.append(l)."""
    o = Ops(memo_base)
    o.empty_list()
    idx = o.put()
    o.get(idx).append()
    return bytes(o.b)


def self_referencing_dict(memo_base: int = 1_000_000) -> bytes:
    """d = {}; d["self"] = d; d["list"] = [d]."""
    o = Ops(memo_base)
    o.empty_dict()
    idx = o.put()
    o.mark().str("self").get(idx).str("list").empty_list().get(idx).append().setitems()
    return bytes(o.b)


def call(module: str, name: str, *args: Any) -> bytes:
    """A pickle fragment that calls module.name(*args) when unpickled by a full unpickler (REDUCE)."""
    o = Ops(2_000_000)
    o.global_(module, name).mark()
    for a in args:
        push_plain(o, a)
    o.tuple().reduce()
    return bytes(o.b)


def push_plain(o: Ops, value: Any) -> None:
    if isinstance(value, bool):
        o.bool(value)
    elif isinstance(value, int):
        o.int(value)
    elif isinstance(value, float):
        o.float(value)
    elif isinstance(value, str):
        o.str(value)
    elif value is None:
        o.none()
    elif isinstance(value, (list, tuple)):
        if isinstance(value, list):
            o.empty_list().mark()
            for v in value:
                push_plain(o, v)
            o.appends()
        else:
            o.mark()
            for v in value:
                push_plain(o, v)
            o.tuple()
    elif isinstance(value, dict):
        o.empty_dict().mark()
        for k, v in value.items():
            push_plain(o, k)
            push_plain(o, v)
        o.setitems()
    else:
        raise TypeError(type(value))


def splice(pkl: bytes, replacement: bytes, placeholder: str = PLACEHOLDER) -> bytes:
    """Replace the pickled placeholder string (BINUNICODE, as torch.save writes it) by other opcodes pushing one
    object. The memo PUT that follows the string is kept: it now memoizes the replacement."""
    data = placeholder.encode()
    needle = b"X" + struct.pack("<I", len(data)) + data
    assert pkl.count(needle) == 1, "placeholder not found exactly once in data.pkl"
    return pkl.replace(needle, replacement)
