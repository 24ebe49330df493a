"""The envelope and its wire headers; the codec."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from pydantic import BaseModel, ConfigDict, Field

from meshlink import DecodeError, Message
from meshlink.codec import Decoder, encode, type_name
from meshlink.errors import EncodeError, is_retryable


class Item(BaseModel):
    sku: str
    qty: int


def test_wire_headers_use_cloudevents_binary_names() -> None:
    m = Message(body=b"{}", type="T", source="svc", correlation_id="c", causation_id="k", attempt=2)
    h = m.to_headers()
    assert h["ce_specversion"] == "1.0"
    assert h["ce_id"] == m.id
    assert h["ce_type"] == "T"
    assert h["ce_source"] == "svc"
    assert datetime.fromisoformat(h["ce_time"]) == m.time
    assert h["content-type"] == "application/json"
    assert h["correlation-id"] == "c"
    assert h["causation-id"] == "k"
    assert h["attempt"] == "2"


def test_headers_that_repeat_their_default_stay_off_the_wire() -> None:
    """idempotency-key = ce_id, attempt 1, no correlation or causation: none is sent, and a
    reader restores each default (the message reads back equal)."""
    m = Message(body=b"{}", type="T", source="svc")
    for names in (set(m.to_headers()), {k for k, _ in m.header_pairs()}):
        assert names == {"ce_specversion", "ce_id", "ce_type", "ce_source", "ce_time", "content-type"}
    assert Message.from_headers(m.header_pairs(), m.body) == m
    again = m.replace(idempotency_key="order-7", attempt=3)
    h = again.to_headers()
    assert h["idempotency-key"] == "order-7"
    assert h["attempt"] == "3"
    assert Message.from_headers(h, again.body) == again


def test_an_extension_named_like_an_envelope_header_never_reaches_the_wire() -> None:
    """A ready Message is sent as it is: an extension header named like an envelope field
    must not stand in for a field left at its default (attempt 1, key = id)."""
    m = Message(body=b"{}", headers={"attempt": "5", "idempotency-key": "other", "ce_id": "x", "a": "1"})
    for wire in (m.to_headers(), {k: v.decode() for k, v in m.header_pairs()}):
        assert "attempt" not in wire
        assert "idempotency-key" not in wire
        assert wire["ce_id"] == m.id
        assert wire["a"] == "1"
    back = Message.from_headers(m.header_pairs(), m.body)
    assert back.attempt == 1
    assert back.idempotency_key == m.id


def test_round_trip_through_headers_is_lossless() -> None:
    m = Message(
        body=b"x",
        type="T",
        key="k",
        idempotency_key="biz-1",
        time=datetime(2020, 1, 1, tzinfo=UTC),
        headers={"a": "1"},
    )
    assert Message.from_headers(m.to_headers(), m.body, key="k") == m


def test_round_trip_through_encoded_header_pairs_is_lossless() -> None:
    """Kafka carries (name, bytes) pairs: header_pairs() and from_headers(pairs) are inverses."""
    m = Message(
        body=b"x", type="T", key="k", correlation_id="c", causation_id="z", attempt=3, headers={"a": "1"}
    )
    pairs = m.header_pairs()
    assert all(isinstance(v, bytes) for _, v in pairs)
    assert dict((k, v.decode()) for k, v in pairs) == m.to_headers()
    assert Message.from_headers(pairs, m.body, key="k") == m


def test_a_repeated_header_counts_by_its_last_value_as_in_a_mapping() -> None:
    pairs = [("x-a", b"1"), ("ce_type", b"Old"), ("x-a", b"2"), ("ce_type", b"New")]
    m = Message.from_headers(pairs, b"{}")
    assert m.type == "New"
    assert m.headers == {"x-a": "2"}


def test_message_ids_are_random_uuid4_and_unique() -> None:
    ids = {Message(body=b"").id for _ in range(10_000)}
    assert len(ids) == 10_000
    for raw in list(ids)[:100]:
        parsed = uuid.UUID(hex=raw)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == raw


def test_message_is_immutable() -> None:
    m = Message(body=b"x", headers={"a": "1"})
    with pytest.raises(AttributeError):
        m.type = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        m.headers["a"] = "2"  # type: ignore[index]


def test_foreign_message_without_envelope_headers_is_still_readable() -> None:
    m = Message.from_headers({"attempt": b"not-a-number", "ce_time": "yesterday", "x": b"y"}, b"{}")
    assert m.id
    assert m.idempotency_key == m.id
    assert m.attempt == 1
    assert m.headers == {"x": "y"}


def test_codec_encodes_models_dicts_and_passes_bytes_through() -> None:
    assert encode(Item(sku="a", qty=1)) == (b'{"sku":"a","qty":1}', "application/json")
    assert encode({"a": [1, 2]}) == (b'{"a":[1,2]}', "application/json")
    assert encode(b"\x00raw") == (b"\x00raw", "application/octet-stream")
    assert type_name(Item(sku="a", qty=1)) == "Item"
    with pytest.raises(EncodeError):
        encode(object())


def test_a_model_encodes_exactly_as_its_model_dump_json_says() -> None:
    class Aliased(BaseModel):
        model_config = ConfigDict(serialize_by_alias=True)
        sku: str = Field(alias="SKU")

    class Custom(BaseModel):
        sku: str

        def model_dump_json(self, **kwargs: object) -> str:  # type: ignore[override]
            return '{"custom":true}'

    assert encode(Aliased(SKU="a")) == (Aliased(SKU="a").model_dump_json().encode(), "application/json")
    assert encode(Aliased(SKU="a"))[0] == b'{"SKU":"a"}'
    assert encode(Custom(sku="a"))[0] == b'{"custom":true}'  # an override is the model's own way


def test_header_pairs_of_many_distinct_types_stay_right_and_their_memory_bounded() -> None:
    from meshlink import message as message_module

    for i in range(3 * message_module._MAX_PAIRS):
        m = Message(body=b"{}", type=f"T{i}", source=f"s{i % 7}", content_type="application/json")
        pairs = dict(m.header_pairs())
        assert pairs["ce_type"] == f"T{i}".encode()
        assert pairs["ce_source"] == f"s{i % 7}".encode()
        assert pairs["content-type"] == b"application/json"
    assert len(message_module._TYPE_PAIRS) <= message_module._MAX_PAIRS


def test_a_message_rebuilt_from_headers_is_a_frozen_message_like_one_constructed() -> None:
    import dataclasses

    built = Message(body=b"{}", type="T", source="s", key="k", correlation_id="c", attempt=3)
    rebuilt = Message.from_headers(built.to_headers(), built.body, key="k")
    assert type(rebuilt) is Message
    assert rebuilt == built
    with pytest.raises(dataclasses.FrozenInstanceError):
        rebuilt.attempt = 4  # type: ignore[misc]
    assert dataclasses.replace(rebuilt, attempt=4).attempt == 4

    class Custom(Message):
        __slots__ = ()

    custom = Custom.from_headers(built.to_headers(), built.body, key="k")
    assert type(custom) is Custom
    assert custom.correlation_id == "c"
    assert custom.attempt == 3


def test_decode_failure_is_a_typed_non_retryable_error() -> None:
    decode = Decoder(Item)
    assert decode(b'{"sku":"a","qty":2}') == Item(sku="a", qty=2)
    with pytest.raises(DecodeError, match="qty") as err:
        decode(b'{"sku":"a","qty":"many"}')
    assert not is_retryable(err.value)
    with pytest.raises(DecodeError):
        decode(b"{not json")
    assert Decoder(list[int])(b"[1,2]") == [1, 2]
    assert is_retryable(RuntimeError())


def test_a_message_survives_pickle_copy_and_deepcopy_with_read_only_headers() -> None:
    import copy
    import pickle

    original = Message(body=b"{}", type="T", key="k", attempt=2, headers={"tenant": "a"})
    rebuilt = Message.from_headers(original.to_headers(), original.body, key="k")
    for message in (original, rebuilt):
        for clone in (pickle.loads(pickle.dumps(message)), copy.deepcopy(message), copy.copy(message)):
            assert type(clone) is Message
            assert clone == message
            assert clone.headers == {"tenant": "a"}
            with pytest.raises(TypeError):
                clone.headers["tenant"] = "b"  # type: ignore[index]
