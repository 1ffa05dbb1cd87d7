"""Issue 3, part 5: property-based fuzzing of the checkpoint reader.

Real checkpoints are truncated, bit-flipped and spliced; for every mutation lexport must end cleanly: an exit code
from the documented set (a flipped byte inside tensor data is still a valid checkpoint, so 0 is fine), never 70,
never a traceback, nothing partial in the output directory, the input unchanged. In-process (invoke) and bounded
so the whole file runs in well under a minute.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DOCUMENTED = {0, 1, 2, 3, 4, 5, 6}
FUZZ_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Source:
    name: str
    data: bytes
    pickle_span: tuple[int, int]  # where the pickle (hyper_parameters, tensor metadata) lives in the file


def _zip_member_span(data: bytes, suffix: str) -> tuple[int, int]:
    import io

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(suffix))
    off = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[off + 26 : off + 30])
    start = off + 30 + name_len + extra_len
    return start, start + info.compress_size


@pytest.fixture(scope="module")
def sources(ckpts: dict, tmp_path_factory: pytest.TempPathFactory) -> list[Source]:
    """A Lightning checkpoint, a plain state dict, and a legacy (pre-zip) torch.save file."""
    tmp = tmp_path_factory.mktemp("fuzz-sources")
    lightning = Path(ckpts["classifier"]).read_bytes()
    sd = torch.load(str(ckpts["classifier"]), weights_only=True)["state_dict"]
    plain_path, legacy_path = tmp / "plain.pt", tmp / "legacy.pt"
    torch.save(sd, str(plain_path))
    torch.save({"state_dict": sd, "epoch": 1, "hyper_parameters": {"input_size": 10, "hidden_size": 20,
                                                                   "num_classes": 2}},
               str(legacy_path), _use_new_zipfile_serialization=False)
    plain, legacy = plain_path.read_bytes(), legacy_path.read_bytes()
    return [
        Source("lightning", lightning, _zip_member_span(lightning, "/data.pkl")),
        Source("plain", plain, _zip_member_span(plain, "/data.pkl")),
        Source("legacy", legacy, (0, min(len(legacy), 2048))),
    ]


def _mutate(draw, sources: list[Source]) -> tuple[str, bytes]:
    src = draw(st.sampled_from(sources))
    data = bytearray(src.data)
    kind = draw(st.sampled_from(["truncate", "flip", "flip-pickle", "splice", "join", "zero-run"]))
    n = len(data)
    if kind == "truncate":
        cut = draw(st.integers(0, n - 1))
        return f"{src.name}:truncate@{cut}", bytes(data[:cut])
    if kind in ("flip", "flip-pickle"):
        lo, hi = (0, n - 1) if kind == "flip" else (src.pickle_span[0], src.pickle_span[1] - 1)
        flips = draw(st.lists(st.tuples(st.integers(lo, hi), st.integers(1, 255)), min_size=1, max_size=8))
        for pos, mask in flips:
            data[pos] ^= mask
        return f"{src.name}:{kind}{flips}", bytes(data)
    if kind == "zero-run":
        start = draw(st.integers(0, n - 1))
        length = draw(st.integers(1, 512))
        data[start : start + length] = bytes(len(data[start : start + length]))
        return f"{src.name}:zero-run@{start}+{length}", bytes(data)
    other = draw(st.sampled_from(sources)).data
    if kind == "splice":  # overwrite a run with bytes from elsewhere (same or another file)
        a = draw(st.integers(0, len(other) - 1))
        length = draw(st.integers(1, 1024))
        chunk = other[a : a + length]
        at = draw(st.integers(0, n - 1))
        data[at : at + len(chunk)] = chunk
        return f"{src.name}:splice@{at}<-{a}+{len(chunk)}", bytes(data)
    # join: the head of one file and the tail of another
    i = draw(st.integers(0, n))
    j = draw(st.integers(0, len(other)))
    return f"{src.name}:join@{i}+{j}", bytes(data[:i]) + other[j:]


def _run_one(args_for, label: str, blob: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="lexport-fuzz-") as d:
        d = Path(d)
        (d / "in").mkdir()
        path = d / "in" / "fuzzed.ckpt"
        path.write_bytes(blob)
        digest = hashlib.sha256(blob).hexdigest()
        out = d / "out"
        res = invoke(path, *args_for(out))
        assert res.code in DOCUMENTED, (label, res)
        assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, (label, res)
        assert "internal error" not in res.stderr, (label, res)
        if res.code != 0:
            assert res.stderr.count("error (") >= 1, (label, res)
        produced = sorted(p.name for p in out.iterdir()) if out.exists() else []
        assert produced == (["fuzzed.pt"] if res.code == 0 else []), (label, res, produced)
        assert sorted(p.name for p in (d / "in").iterdir()) == ["fuzzed.ckpt"], label
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{label}: the input was modified"


@FUZZ_SETTINGS
@given(data=st.data())
def test_fuzzed_checkpoints_fail_cleanly(sources: list[Source], data: st.DataObject) -> None:
    """Weights only (no user code): the reader, the checks and the state-dict writer with verification."""
    label, blob = _mutate(data.draw, sources)
    _run_one(lambda out: ("--to", "state-dict", "--output-dir", out), label, blob)


@settings(FUZZ_SETTINGS, max_examples=40)
@given(data=st.data())
def test_fuzzed_checkpoints_with_module_fail_cleanly(sources: list[Source], data: st.DataObject) -> None:
    """Building the module from fuzzed hyper_parameters and tensor metadata: exit 3 or 4, never a crash."""
    label, blob = _mutate(data.draw, sources[:1] + sources[2:])
    _run_one(
        lambda out: ("--module", "fixtures.modules:MyClassifierModule", "--attr", "model", "--to", "state-dict",
                     "--output-dir", out),
        label,
        blob,
    )


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 4, 22, 100, 512, -1, -22, -100])
def test_truncation_points(sources: list[Source], cut: int) -> None:
    """The corners hypothesis may miss: a few bytes, a lone zip magic, and cuts inside the zip directory."""
    for src in sources:
        blob = src.data[:cut] if cut >= 0 else src.data[:cut]
        _run_one(lambda out: ("--to", "state-dict", "--output-dir", out), f"{src.name}:cut{cut}", blob)
