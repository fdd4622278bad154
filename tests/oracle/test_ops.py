"""The oracle's vocabulary: operations and chains round-trip through JSON; strategies stay in
the bounds the machines rely on."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from pyimago.oracle.ops import ChainSpec, Op, OpKind
from pyimago.oracle.strategies import (
    Geometry,
    chain_specs,
    grow_ops,
    max_disk_size,
    modify_ranges,
    past_end_ops,
    read_ranges,
    shrink_ops,
)

geometries = st.builds(
    lambda g, clusters, extra: Geometry(max(clusters * g + extra * 512, 512),
                                        g, max_disk_size(g)),
    st.sampled_from((512, 1024, 4096, 65536)),
    st.integers(1, 40),
    st.integers(-1, 1),
)


@given(chain_specs())
def test_chain_specs_round_trip_and_are_valid(chain: ChainSpec) -> None:
    assert ChainSpec.from_json(json.loads(json.dumps(chain.to_json()))) == chain
    assert 1 <= len(chain.layers) <= 3
    assert all(layer.format == "qcow2" for layer in chain.layers[1:])
    for index, layer in enumerate(chain.layers):
        assert layer.size % 512 == 0 and layer.size > 0
        if index:
            assert layer.preallocation == "off"
        for op in layer.build:
            assert op.offset >= 0 and op.offset + op.length <= layer.size and op.length > 0


@given(geometries, st.data())
def test_ranges_respect_the_disk(geo: Geometry, data: st.DataObject) -> None:
    offset, length = data.draw(modify_ranges(geo))
    assert offset >= 0 and length > 0 and offset + length <= geo.size
    offset, length = data.draw(read_ranges(geo))
    assert offset >= 0 and length > 0
    op = data.draw(past_end_ops(geo))
    assert op.offset + op.length > geo.size
    grow = data.draw(grow_ops(geo))
    assert geo.size <= grow.value <= max(geo.max_size, geo.size) and grow.value % 512 == 0
    shrink = data.draw(shrink_ops(geo))
    assert 512 <= shrink.value <= geo.size and shrink.value % 512 == 0


def test_every_op_kind_round_trips_and_describes() -> None:
    ops = [
        Op(OpKind.WRITE, 3, 5),
        Op(OpKind.WRITE_PAST_END, 10, 20, mode="discard_to_any"),
        Op(OpKind.RESIZE, value=4096, mode="write-data"),
        Op(OpKind.SWEEP, 1, 2, value=512),
        Op(OpKind.READ_PARALLEL, value=3),
        Op(OpKind.REOPEN),
    ]
    for op in ops:
        assert Op.from_json(json.loads(json.dumps(op.to_json()))) == op
        assert op.describe()
    assert "DISCARD_TO_ANY!PAST-END" in ops[1].describe()
    assert ops[3].touches(513) and not ops[3].touches(515)
    assert {k.value for k in OpKind} >= {"read", "write", "resize", "reopen", "sweep"}
