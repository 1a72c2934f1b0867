from __future__ import annotations

from daskinfer._internal.bundler import BlockRef, Bundler


def _ref(key: str, rows: int) -> BlockRef:
    return BlockRef(key=key, future=None, rows=rows, nbytes=rows * 8)


def test_take_cuts_exact_rows_across_blocks():
    b = Bundler()
    for i, rows in enumerate([3, 5, 2]):
        b.add(_ref(f"b{i}", rows))
    first = b.take(4)
    assert [(r.key, s, e) for r, s, e in first] == [("b0", 0, 3), ("b1", 0, 1)]
    assert first[0][0].exhausted and not first[1][0].exhausted
    second = b.take(4)
    assert [(r.key, s, e) for r, s, e in second] == [("b1", 1, 5)]
    assert b.rows == 2
    assert [(r.key, s, e) for r, s, e in b.take(10)] == [("b2", 0, 2)]
    assert b.rows == 0 and len(b) == 0


def test_take_block_and_drain():
    b = Bundler()
    b.add(_ref("a", 4))
    b.add(_ref("b", 6))
    b.take(1)
    assert [(r.key, s, e) for r, s, e in b.take_block()] == [("a", 1, 4)]
    drained = b.drain()
    assert [r.key for r in drained] == ["b"] and drained[0].exhausted
    assert b.rows == 0
