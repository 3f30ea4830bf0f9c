"""Property-based tests: what a store worker reads out of the chunk stream, whatever it is.

A replica may be buggy or compromised and publish anything on ``ossensor.chunks.>``, so the
store worker's reading of a message (``cluster/parts.py``) is driven here with hypothesis,
without NATS: arbitrary header dicts and raw header blocks (missing, duplicated, huge,
non-ASCII, negative or non-numeric values, lone surrogates, part numbers out of range, totals
that disagree) against arbitrary subjects, and parts of several chunks arriving out of order,
repeated, redelivered, copied with other bytes, never completed or too old, between garbage.

What must hold:

* :func:`read_headers` returns the header the contract gives (an independent reading of it,
  :func:`contract`) or raises :class:`BadMessage`, never anything else; the refusal's
  ``culprit`` is a header (or the subject) that really breaks the contract, and its text names
  it in one bounded line.
* :class:`Reassembly` never holds more chunks or bytes than its bounds after any call, drops
  only what its bounds or its wait force (the oldest first), hands every message back at most
  once, and gives a chunk back exactly when its last part comes, as the first copy of each
  part it held (a model of the documented behaviour, :class:`ReassemblyMachine`).
* A chunk cut in parts as a replica cuts it comes back byte for byte in any order, whatever
  garbage, repeats and copies come between its parts, and what was held is never touched by
  them.

``OSSENSOR_FUZZ_EXAMPLES=N`` runs N examples per test (a few hundred by default, as
``test_fuzz.py``; see vsensor/README.md, "Fuzzing").
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from ossensor_vsensor.cluster import (H_MSG_ID, H_PART, H_SENSOR, H_SEQUENCE, PARTITIONS,
                                      SUBJECT_PREFIX, partition)
from ossensor_vsensor.cluster.names import token
from ossensor_vsensor.cluster.parts import (MAX_SENSOR_BYTES, BadMessage, Header, Reassembly,
                                            read_headers)

EXAMPLES = os.environ.get("OSSENSOR_FUZZ_EXAMPLES")


def examples(default: int) -> int:
    return int(EXAMPLES) if EXAMPLES else default


FUZZ = hsettings(max_examples=examples(250), deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
#: The longest refusal text (the worker logs it cut at 300 characters, on one line).
MAX_WHY = 400
CULPRITS = (H_SENSOR, H_SEQUENCE, H_PART, "subject")


# -- what arrives -------------------------------------------------------------------------------

#: Characters that trip naive checks: digits that are not ASCII, signs, blanks, separators,
#: NUL, CR/LF, U+FFFD (what nats-py makes of bad UTF-8), lone surrogates (a header read with
#: ``surrogateescape``), subject wildcards.
TRICKY = "0123456789-+ ./_\t\r\n\x00\u0661\u00b2\uff11\ufffd\udc80\ud800\u00e9*>"


def hostile_text(max_size: int = 30) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(alphabet=TRICKY, max_size=max_size),
        st.text(alphabet=st.characters(exclude_categories=()), max_size=max_size),
        st.builds(lambda c, n: c * n,  # huge, or long once escaped
                  st.sampled_from(["9", "a", "\u00e9", "\U0010ffff", "/", "\x00", "\udc80"]),
                  st.integers(0, 5000)))


def numbers() -> st.SearchStrategy[str]:
    """Decimal numbers, good and bad: negative, too big, leading zeros, not numbers."""
    return st.one_of(
        st.integers(0, (1 << 64) - 1).map(str),
        st.integers(-(1 << 70), 1 << 70).map(str),
        st.builds(lambda zeros, n: "0" * zeros + str(n), st.integers(0, 25),
                  st.integers(0, (1 << 64) + 5)),
        st.sampled_from([str((1 << 64) - 1), str(1 << 64), "0" * 20 + "1", "9" * 20, "0"]),
        st.sampled_from(["", " 1", "1 ", "+1", "1e3", "0x10", "1_000", "1.0", "\u0661", "\uff11"]),
        hostile_text(8))


def part_values() -> st.SearchStrategy[str]:
    small = st.integers(-2, 12).map(str)
    return st.one_of(
        st.builds(lambda i, n: f"{i}/{n}", small, small),
        st.builds(lambda i, n: f"{i}/{n}", numbers(), numbers()),
        st.sampled_from(["1/", "/2", "1/2/3", "1//2", "1 /2", "2/2\n", "1/0000002"]),
        hostile_text(12))


def sensor_names() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["a", "node-1", "node two.x", "\u00e9t\u00e9", "*", ">"]),
                     hostile_text(40))


def subject_of(sensor: str) -> str:
    return f"{SUBJECT_PREFIX}.{partition(sensor, PARTITIONS)}.{token(sensor)}"


def encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def messages(draw) -> tuple[str, dict[str, str]]:
    """A subject and the headers of a message: often what the contract wants, often not."""
    sensor = draw(sensor_names())
    headers: dict[str, str] = {}
    if draw(st.integers(0, 9)):
        headers[H_SENSOR] = sensor
    if draw(st.integers(0, 9)):
        headers[H_SEQUENCE] = draw(numbers())
    if draw(st.booleans()):
        headers[H_PART] = draw(part_values())
    if draw(st.booleans()):
        headers[H_MSG_ID] = draw(hostile_text())
    headers.update(draw(st.dictionaries(  # the names in another case, or other headers
        st.one_of(st.sampled_from([H_SENSOR.lower(), H_SEQUENCE.upper(), H_PART + " "]),
                  st.text(max_size=20)),
        hostile_text(), max_size=3)))
    other = draw(sensor_names())
    choices = [draw(hostile_text(60)), draw(hostile_text(60))]
    for name in (sensor, other):
        if encodable(name):
            choices += [subject_of(name), f"{SUBJECT_PREFIX}.p{PARTITIONS}.{token(name)}",
                        subject_of(name) + ".x"]
    subject = draw(st.sampled_from(choices))
    if encodable(sensor) and draw(st.integers(0, 3)) > 1:
        subject = subject_of(sensor)
    return subject, headers


# -- an independent reading of the contract -----------------------------------------------------

def contract(subject: str, headers: dict[str, str], max_parts: int) -> Header | set[str]:
    """The header the contract (``cluster/__init__.py``) gives, or what breaks it, written
    apart from :func:`read_headers`."""
    broken = set()
    sensor = headers.get(H_SENSOR, "")
    if not sensor or not encodable(sensor) or len(sensor.encode()) > MAX_SENSOR_BYTES:
        broken.add(H_SENSOR)
    elif subject != subject_of(sensor):
        broken.add("subject")
    number = re.fullmatch(r"[0-9]{1,20}", headers.get(H_SEQUENCE, ""))
    if number is None or int(number[0]) >= 1 << 64:
        broken.add(H_SEQUENCE)
    part = i = n = None
    if H_PART in headers:
        part = re.fullmatch(r"([0-9]{1,6})/([0-9]{1,6})", headers[H_PART])
        if part is not None:
            i, n = int(part[1]), int(part[2])
        if part is None or not 1 <= i <= n <= max_parts:
            broken.add(H_PART)
    if broken:
        return broken
    assert number is not None
    if part is None:
        return Header(sensor, int(number[0]))
    return Header(sensor, int(number[0]), i, n)


def check(subject: str, headers: dict[str, str], max_parts: int) -> Header | None:
    """:func:`read_headers` against :func:`contract`: the header, or None when refused."""
    expected = contract(subject, headers, max_parts)
    try:
        got = read_headers(subject, headers, max_parts)
    except BadMessage as refused:
        why = str(refused)
        assert isinstance(expected, set), f"refused a good message: {why}"
        assert refused.culprit in expected, (refused.culprit, expected)
        assert refused.culprit in why and len(why) <= MAX_WHY and "\n" not in why, why
        return None
    assert got == expected
    return got


@FUZZ
@given(message=messages(), max_parts=st.integers(1, 200))
def test_any_headers_give_the_contract_s_header_or_a_refusal_naming_the_culprit(message,
                                                                              max_parts):
    subject, headers = message
    check(subject, headers, max_parts)


@FUZZ
@given(lines=st.lists(st.tuples(
    st.one_of(st.sampled_from([H_SENSOR, H_SEQUENCE, H_PART, H_SENSOR.lower(), "X-Other"])
              .map(str.encode), st.binary(max_size=12)),
    st.one_of(sensor_names(), numbers(), part_values())
    .map(lambda text: text.encode(errors="surrogatepass")) | st.binary(max_size=40)),
    max_size=8), message=messages())
def test_raw_header_blocks_as_nats_py_reads_them(lines, message):
    """Duplicated names, bytes that are not UTF-8, a CR or LF inside a value: the block goes
    through nats-py's own parser, as a fetched message's would."""
    client = pytest.importorskip("nats.aio.client")
    subject, _ = message
    raw = b"".join(name + b": " + value + b"\r\n" for name, value in lines)
    headers = client.Client._parse_header_lines(raw)
    if headers.get(H_SENSOR) and encodable(headers[H_SENSOR]) and len(subject) % 2:
        subject = subject_of(headers[H_SENSOR])  # past the subject, half of the time
    check(subject, headers, 130)


# -- the reassembly against a model of what it documents ----------------------------------------

@dataclass
class Held:
    started: float
    touched: float
    bodies: dict[int, bytes] = field(default_factory=dict)
    messages: dict[int, object] = field(default_factory=dict)  # part -> message to acknowledge
    sequences: dict[int, int] = field(default_factory=dict)  # part -> stream sequence

    @property
    def size(self) -> int:
        return sum(map(len, self.bodies.values()))


class ReassemblyMachine(RuleBasedStateMachine):
    """Parts of a few chunks (small pools, so keys collide), checked headers, garbage,
    redeliveries, copies, time: after every step the reassembly is in its bounds and agrees
    with a model of its docstrings."""

    MAX_PARTS = 5

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.stream = 0
        self.model: OrderedDict[tuple[str, int, int], Held] = OrderedDict()
        self.released: set[str] = set()  # the messages handed back (acknowledged)
        self.parts: Reassembly | None = None

    @initialize(max_bytes=st.integers(1, 300), max_open=st.integers(1, 5),
                wait=st.one_of(st.integers(1, 200).map(float), st.floats(1.0, 200.0)))
    def make(self, max_bytes, max_open, wait):
        self.parts = Reassembly(max_bytes=max_bytes, max_open=max_open, wait=wait)

    def _message(self) -> tuple[str, int]:
        """A new stream message (named by its stream sequence) and its sequence."""
        self.stream += 1
        return f"m{self.stream}", self.stream

    def _release(self, messages: list[object]) -> None:
        for message in messages:
            assert message not in self.released, f"{message} acknowledged twice"
            self.released.add(message)

    def _add(self, header: Header, body: bytes, message: object, sequence: int) -> None:
        key = (header.sensor, header.sequence, header.parts)
        model = self.model.get(key)
        if model is None:
            model = self.model[key] = Held(self.now, self.now)
        whole, out, dropped = self.parts.add(header, message, body, now=self.now,
                                             stream_sequence=sequence)
        if header.part in model.bodies:  # held already: only a redelivery takes its place
            if model.sequences[header.part] == sequence:
                model.messages[header.part] = message
            assert (whole, out, dropped) == (None, [], [])
            return
        model.bodies[header.part] = body
        model.messages[header.part] = message
        model.sequences[header.part] = sequence
        if len(model.bodies) == header.parts:
            del self.model[key]
            assert whole == b"".join(model.bodies[i] for i in range(1, header.parts + 1))
            assert out == list(model.messages.values()) and dropped == []
            self._release(out)
            return
        assert whole is None and out == []
        expected = []
        while self.model and (len(self.model) > self.parts.max_open
                              or sum(h.size for h in self.model.values()) > self.parts.max_bytes):
            old_key, old = self.model.popitem(last=False)
            expected.append((old_key, list(old.messages.values())))
        assert [(k, chunk.messages) for _, k, chunk in dropped] == expected
        self._release([m for _, _, chunk in dropped for m in chunk.messages])

    @rule(sensor=st.sampled_from(["a", "b", "\u00e9"]), sequence=st.integers(0, 2),
          numbers=st.tuples(st.integers(1, MAX_PARTS), st.integers(1, MAX_PARTS)).map(sorted),
          body=st.one_of(st.binary(max_size=40), st.binary(max_size=400)))
    def part(self, sensor, sequence, numbers, body):
        """A part as a replica publishes it, read as the worker does (only parts of several
        go to the reassembly)."""
        headers = {H_SENSOR: sensor, H_SEQUENCE: str(sequence),
                   H_PART: f"{numbers[0]}/{numbers[1]}"}
        header = check(subject_of(sensor), headers, self.MAX_PARTS)
        assert header is not None
        if header.parts > 1:
            self._add(header, body, *self._message())

    @rule(message=messages(), body=st.binary(max_size=100))
    def garbage(self, message, body):
        header = check(*message, max_parts=self.MAX_PARTS)
        if header is not None and header.parts > 1:
            self._add(header, body, *self._message())

    @rule(data=st.data(), same_bytes=st.booleans())
    def again(self, data, same_bytes):
        """A held part again: the same stream message redelivered, or another copy (a
        retry's, or a forgery) whose bytes may differ."""
        held = [(key, part) for key, model in self.model.items() for part in model.bodies]
        if not held:
            return
        (sensor, sequence, parts), part = data.draw(st.sampled_from(held))
        model = self.model[(sensor, sequence, parts)]
        body = model.bodies[part] if same_bytes else data.draw(st.binary(max_size=50))
        if data.draw(st.booleans()):
            self.stream += 1  # the same stream message, delivered again
            self._add(Header(sensor, sequence, part, parts), body,
                      f"m{model.sequences[part]} again {self.stream}", model.sequences[part])
        else:
            self._add(Header(sensor, sequence, part, parts), body, *self._message())

    @rule(seconds=st.one_of(st.integers(0, 120).map(float), st.floats(0.0, 120.0)))
    def later(self, seconds):
        self.now += seconds

    @rule(past=st.booleans())
    def to_the_edge(self, past):
        """To the end of the oldest chunk's wait, or just past it."""
        if self.model and self.parts is not None:
            first = next(iter(self.model.values()))
            edge = first.started + self.parts.wait + (1e-6 if past else 0.0)
            self.now = max(self.now, edge)

    @rule()
    def expire(self):
        dropped = self.parts.expired(now=self.now)
        expected = [(key, list(model.messages.values())) for key, model in self.model.items()
                    if self.now - model.started > self.parts.wait]
        for key, _ in expected:
            del self.model[key]
        assert [(key, chunk.messages) for _, key, chunk in dropped] == expected
        self._release([m for _, _, chunk in dropped for m in chunk.messages])

    @rule(every=st.floats(0.0, 60.0))
    def touch(self, every):
        due = self.parts.to_touch(every, now=self.now)
        expected = []
        for model in self.model.values():
            if self.now - model.touched >= every:
                model.touched = self.now
                expected += model.messages.values()
        assert due == expected

    @invariant()
    def in_bounds_and_as_the_model(self):
        parts = self.parts
        if parts is None:
            return
        assert len(parts.open) <= parts.max_open
        assert parts.size <= parts.max_bytes
        assert parts.size == sum(chunk.size for chunk in parts.open.values()) \
            == sum(len(b) for chunk in parts.open.values() for b in chunk.bodies.values())
        assert list(parts.open) == list(self.model)
        for key, chunk in parts.open.items():
            model = self.model[key]
            assert chunk.bodies == model.bodies  # what was held is never replaced
            assert len(chunk.bodies) < chunk.parts == key[2]
            assert set(chunk.bodies) <= set(range(1, chunk.parts + 1))
            assert chunk.messages == list(model.messages.values())


ReassemblyMachine.TestCase.settings = hsettings(
    max_examples=examples(100), stateful_step_count=40, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow])
TestReassembly = ReassemblyMachine.TestCase


# -- a chunk cut as a replica cuts it ----------------------------------------------------------

@FUZZ
@given(data=st.data(), sensor=st.sampled_from(["a", "node-1", "node two.x", "\u00e9t\u00e9"]),
       sequence=st.integers(0, (1 << 64) - 1), body=st.binary(min_size=2, max_size=3000))
def test_a_chunk_in_parts_comes_back_whole_in_any_order_whatever_comes_between(
        data, sensor, sequence, body):
    size = data.draw(st.integers(-(-len(body) // 40), len(body) - 1), label="part size")
    count = -(-len(body) // size)
    pieces = [body[i * size:(i + 1) * size] for i in range(count)]  # as ingest.py cuts
    max_parts = count + data.draw(st.integers(0, 3))
    subject = subject_of(sensor)
    base = {H_SENSOR: sensor, H_SEQUENCE: str(sequence)}
    key = (sensor, sequence, count)
    parts = Reassembly(max_bytes=1 << 30, max_open=1 << 20)  # garbage cannot evict it here
    order = data.draw(st.permutations(range(1, count + 1)), label="order")
    held: dict[int, tuple[object, int]] = {}  # part -> (message to acknowledge, stream seq)
    stream = 0

    def ours(i: int) -> dict[str, str]:
        return {**base, H_PART: f"{i}/{count}"}

    def feed(where: str, headers: dict[str, str], piece: bytes, message: object, seq: int):
        header = check(where, headers, max_parts)
        if header is None or header.parts == 1:
            return None
        whole, out, dropped = parts.add(header, message, piece, now=0.0, stream_sequence=seq)
        assert dropped == []
        if (header.sensor, header.sequence, header.parts) == key:
            assert parts.open.get(key) is None or \
                parts.open[key].bodies == {i: pieces[i - 1] for i in held}
        return whole, out

    while order:
        stream += 1
        what = data.draw(st.integers(0, 4), label="next")
        if what == 0 or not held:  # the next part
            i = order.pop(0)
            message = object()
            held[i] = (message, stream)
            whole, out = feed(subject, ours(i), pieces[i - 1], message, stream)
            if order:
                assert whole is None
            else:
                assert whole == body
                assert out == [held[i][0] for i in held]
        elif what in (1, 2):  # a held part again: redelivered, or another copy
            i = data.draw(st.sampled_from(sorted(held)))
            piece = pieces[i - 1] if what == 1 else data.draw(st.binary(max_size=50))
            message = object()
            seq = held[i][1] if what == 1 else stream
            if what == 1:
                held[i] = (message, seq)
            assert feed(subject, ours(i), piece, message, seq) == (None, [])
        else:  # garbage: anything, or this chunk's headers a little wrong
            if what == 3:
                where, headers = data.draw(messages(), label="garbage")
            else:
                where, headers = subject, {**base, **data.draw(st.dictionaries(
                    st.sampled_from([H_SENSOR, H_SEQUENCE, H_PART]),
                    st.one_of(sensor_names(), numbers(), part_values()), min_size=1))}
            try:
                header = read_headers(where, headers, max_parts)
            except BadMessage:
                header = None
            if header is not None and (header.sensor, header.sequence, header.parts) == key \
                    and header.part not in held:
                continue  # a forged part that comes first wins: not garbage, not this test's
            assert feed(where, headers, data.draw(st.binary(max_size=200)), object(),
                        stream) in (None, (None, []))
    assert key not in parts.open
