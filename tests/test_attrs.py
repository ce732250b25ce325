"""Attribute keys and the chunked writer/reader shared by the sampler and the search space."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import optuna
import pytest

from optuna_ctpe import _attrs
from optuna_ctpe._attrs import ChunkedAttrError
from optuna_ctpe._attrs import CHUNK_JSON_LENGTH
from optuna_ctpe._attrs import read_chunked
from optuna_ctpe._attrs import split_chunks
from optuna_ctpe._attrs import write_chunked


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=9000))
def test_chunks_round_trip_and_each_fits_the_rdb_column(text: str) -> None:
    attrs: dict = {}
    write_chunked(attrs.__setitem__, "ctpe:x", text)
    assert read_chunked(attrs, "ctpe:x") == text
    for key, value in attrs.items():
        if key != "ctpe:x":
            assert len(json.dumps(value)) <= CHUNK_JSON_LENGTH


def test_escaped_characters_count_towards_the_limit() -> None:
    # A quote is one character of text but two of JSON: the 0.1.0 sampler's raw-length cut at
    # 2,045 characters produced values of about 4,000 JSON characters for such text.
    text = '"' * 5000
    chunks = split_chunks(text)
    assert "".join(chunks) == text
    assert all(len(json.dumps(c)) <= CHUNK_JSON_LENGTH for c in chunks)
    assert len(chunks) == 6  # ceil(5000 / 999): 999 quotes encode to 1,998 + 2 characters


def test_header_is_written_last_so_readers_never_see_half_a_value() -> None:
    order: list[str] = []
    write_chunked(lambda key, value: order.append(key), "ctpe:x", "a" * 5000)
    assert order == ["ctpe:x:0", "ctpe:x:1", "ctpe:x:2", "ctpe:x"]


def test_absent_values_read_as_none() -> None:
    assert read_chunked({}, "ctpe:x") is None
    assert read_chunked({}, "ctpe:x", legacy_headerless=True) is None


def test_legacy_headerless_chunks_are_read_only_when_asked() -> None:
    attrs = {"ctpe:relative_params:0": '{"a": ', "ctpe:relative_params:1": "1}"}
    assert read_chunked(attrs, "ctpe:relative_params") is None
    assert read_chunked(attrs, "ctpe:relative_params", legacy_headerless=True) == '{"a": 1}'


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda a: a.pop("ctpe:x:1"), "lacks some of its 2 chunks"),
        (lambda a: a.__setitem__("ctpe:x:1", "b" * 10), "fails its checksum"),
        (lambda a: a.__setitem__("ctpe:x:0", 5), "not text"),
        (lambda a: a.__setitem__("ctpe:x", {"n_chunks": True}), "not a chunk header"),
        (lambda a: a.__setitem__("ctpe:x", {"n_chunks": 0}), "not a chunk header"),
        (lambda a: a.__setitem__("ctpe:x", "3"), "not a chunk header"),
    ],
)
def test_damaged_values_are_clear_errors(tamper, match) -> None:
    attrs: dict = {}
    write_chunked(attrs.__setitem__, "ctpe:x", "a" * 3000)
    tamper(attrs)
    with pytest.raises(ChunkedAttrError, match=match):
        read_chunked(attrs, "ctpe:x")


def test_a_real_storage_keeps_the_chunks(tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'a.db'}"
    study = optuna.create_study(storage=storage, study_name="s")
    text = json.dumps({f"bits:layer{i}": [2, 4, 8] for i in range(300)})
    write_chunked(study.set_user_attr, _attrs.SEARCH_SPACE, text)
    reloaded = optuna.load_study(study_name="s", storage=storage)
    assert read_chunked(reloaded.user_attrs, _attrs.SEARCH_SPACE) == text


def test_every_package_key_carries_the_prefix_and_metric_names_do_not() -> None:
    keys = [
        _attrs.SEARCH_SPACE,
        _attrs.SETTINGS,
        _attrs.SENSITIVITIES,
        _attrs.BASELINES,
        _attrs.SETUP,
        _attrs.SEARCH_SPACE_SIZE,
        _attrs.RELATIVE_PARAMS,
        _attrs.WORKER,
        _attrs.WARM_START,
        _attrs.decision_key("mode"),
    ]
    assert all(k.startswith(_attrs.PREFIX) for k in keys)
    assert len(set(keys)) == len(keys)
    metrics = [_attrs.ACCURACY, _attrs.SIZE_BYTES, _attrs.SIZE_KB, _attrs.COMPRESSION_RATIO]
    assert not any(m.startswith(_attrs.PREFIX) for m in metrics)
