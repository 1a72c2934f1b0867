"""``read_sql``: a query read on the workers through a DB-API connection factory."""

from __future__ import annotations

import builtins
import functools
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd

import dask.dataframe as dd

from daskinfer._internal.ray_args import READER_ARGS, takes_ray_args
from daskinfer.dataset import Dataset
from daskinfer.exceptions import PlanError
from daskinfer.io._source import (
    _check_override_num_blocks,
    _dataset,
    keep_object_columns,
)

logger = logging.getLogger("daskinfer")

# rows of the query read on the client for the columns' types: enough that a column
# NULL in its first rows usually still shows its type, few enough to cost nothing
_SQL_SAMPLE_ROWS = 100
# shards of a read_sql given shard_keys and no override_num_blocks. Ray counts the rows
# on the client (a query over the whole result) and reads in up to 200 tasks of at
# least 50 rows; here the client runs no such query, and each shard is a query that
# the database evaluates over the whole result, so a few
SQL_DEFAULT_SHARDS = 16
_SQL_FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")


def _sql_rows(
    connection_factory: Callable[[], Any],
    query: str,
    sql_params: Any,
    limit: int | None = None,
) -> tuple[list[str], list[Any]]:
    """Run ``query`` on a new connection: the column names and the rows (``limit`` at most).

    The connection is closed before returning; nothing is written, so nothing is
    committed (closing ends the transaction a driver may have opened).
    """
    connection = connection_factory()
    for method in ("cursor", "close"):
        if not callable(getattr(connection, method, None)):
            raise TypeError(
                f"read_sql: connection_factory() returned {type(connection).__name__}, "
                f"which has no {method}() method; return a DB-API 2 connection (PEP 249), "
                "e.g. sqlite3.connect(path)"
            )
    try:
        cursor = connection.cursor()
        # without parameters, as Ray: a driver given some would read "%" as a placeholder
        if sql_params is None:
            cursor.execute(query)
        else:
            cursor.execute(query, sql_params)
        if cursor.description is None:
            raise TypeError(f"read_sql: {query!r} returns no rows; give a query (SELECT ...)")
        names = [column[0] for column in cursor.description]
        rows = cursor.fetchall() if limit is None else cursor.fetchmany(limit)
        return names, list(rows)
    finally:
        connection.close()


def _sql_block(names: Sequence[str], rows: Sequence[Any]) -> pd.DataFrame:
    """Rows of a query as pandas.read_sql makes them (decimals as floats)."""
    return pd.DataFrame.from_records(list(rows), columns=list(names), coerce_float=True)


def _read_sql_block(
    query: str, connection_factory: Callable[[], Any], sql_params: Any, empty: pd.DataFrame
) -> pd.DataFrame:
    """One read task of read_sql (on a worker): the rows of ``query``."""
    names, rows = _sql_rows(connection_factory, query, sql_params)
    if not rows:
        # a shard without rows has no values to type its columns by: give them the
        # types the other blocks have, so that an empty block turns no column to object
        return empty.copy()
    return _sql_block(names, rows)


def _sql_shard_queries(sql: str, shard_keys: Sequence[str], hash_fn: str, n: int) -> list[str]:
    """Ray's sharded queries: a row goes to shard ``MOD(ABS(hash(keys)), n)``.

    The query is wrapped as Ray wraps it (``SELECT * FROM (sql) AS T WHERE ...``; keys
    joined with ``CONCAT``). A row whose hash is NULL (a NULL key) is in no shard of
    Ray's and would be lost: here it goes to shard 0, so that every row is read once.
    """
    inner = sql.strip().rstrip(";").rstrip()  # a trailing ";" cannot sit in a subquery
    key = shard_keys[0] if len(shard_keys) == 1 else f"CONCAT({', '.join(shard_keys)})"
    shard = f"COALESCE(MOD(ABS({hash_fn}({key})), {n}), 0)"
    return [f"SELECT * FROM ({inner}) AS T WHERE {shard} = {i}" for i in builtins.range(n)]


def _sql_sample(sql: str, connection_factory: Callable[[], Any], sql_params: Any) -> pd.DataFrame:
    """The first rows of the query, read on the client for the columns and their types.

    Asked with a ``LIMIT`` around the query, so that a driver that fetches a whole
    result when it executes (psycopg2, PyMySQL) fetches only these rows; a database
    without ``LIMIT`` or subqueries runs the query itself, of which only these rows are
    fetched.
    """
    inner = sql.strip().rstrip(";").rstrip()
    limited = f"SELECT * FROM ({inner}) AS T LIMIT {_SQL_SAMPLE_ROWS}"
    try:
        names, rows = _sql_rows(connection_factory, limited, sql_params)
    except Exception:  # noqa: BLE001  # the query as given says what is wrong, if anything
        names, rows = _sql_rows(connection_factory, sql, sql_params, limit=_SQL_SAMPLE_ROWS)
    return _sql_block(names, rows)


@takes_ray_args("read_sql", READER_ARGS)
def read_sql(
    sql: str,
    connection_factory: Callable[[], Any],
    *,
    sql_params: Any = None,
    shard_keys: Sequence[str] | None = None,
    shard_hash_fn: str = "MD5",
    override_num_blocks: int | None = None,
) -> Dataset:
    """Read the result of a SQL query through a DB-API 2 (PEP 249) connector, as Ray Data.

    ``connection_factory`` takes no arguments and returns a new connection (e.g.
    ``functools.partial(sqlite3.connect, path)``): it is pickled and called on the
    workers, where the reads run. The client runs the query only for its first rows,
    to learn the columns and their types (so that a bad query fails here), and closes
    that connection. Values and types are those of ``pandas.read_sql``.

    Without ``shard_keys`` one task reads the whole result, as in Ray. With them, the
    read is cut into shards as Ray cuts it: shard ``i`` of ``n`` is
    ``SELECT * FROM (sql) AS T WHERE MOD(ABS(shard_hash_fn(keys)), n) = i``, keys
    joined with ``CONCAT``, so the database must have ``MOD``, ``ABS``, ``CONCAT`` (for
    several keys) and the hash function (``MD5`` by default; ``hash``, ``SHA`` ...
    elsewhere; with sqlite3 register one in the factory with
    ``connection.create_function``). ``n`` is ``override_num_blocks``, or
    ``SQL_DEFAULT_SHARDS``; rows whose hash is NULL are read in shard 0 (Ray loses
    them). Whether the database evaluates the shards is asked here: where it cannot,
    ``override_num_blocks > 1`` is refused and, without it, one task reads all (as Ray).
    """
    if not isinstance(sql, str) or not sql.strip():
        raise PlanError(f"read_sql(sql={sql!r}): give the query as a non-empty string")
    if not callable(connection_factory):
        raise PlanError(
            f"read_sql(connection_factory={connection_factory!r}): give a function of no "
            "arguments that opens a new DB-API 2 connection, e.g. "
            "functools.partial(sqlite3.connect, path)"
        )
    _check_override_num_blocks(override_num_blocks, "read_sql")
    if shard_keys is not None and (
        isinstance(shard_keys, str)
        or not isinstance(shard_keys, Sequence)
        or not shard_keys
        or not all(isinstance(k, str) and k.strip() for k in shard_keys)
    ):
        raise PlanError(
            f"read_sql(shard_keys={shard_keys!r}): give a list of column names, e.g. "
            "shard_keys=['id'], or None to read in one task"
        )
    if not isinstance(shard_hash_fn, str) or not _SQL_FUNCTION_NAME.fullmatch(shard_hash_fn):
        raise PlanError(
            f"read_sql(shard_hash_fn={shard_hash_fn!r}): give the name of a SQL function "
            "of your database that hashes a value, e.g. 'MD5' (the default) or 'hash'"
        )
    if override_num_blocks is not None and override_num_blocks > 1 and shard_keys is None:
        raise PlanError(
            f"read_sql(override_num_blocks={override_num_blocks}): a query is read in "
            "several blocks only by shard keys; give shard_keys=[...] too, or drop "
            "override_num_blocks"
        )
    import cloudpickle

    try:  # the factory travels to the workers: an open connection in it cannot
        cloudpickle.dumps((connection_factory, sql_params))
    except Exception as exc:  # any failure to pickle is the same mistake
        raise PlanError(
            f"read_sql(connection_factory={connection_factory!r}): cannot be pickled "
            f"({type(exc).__name__}: {exc}), and it is sent to the workers, which call it; "
            "give a function that opens a new connection when called, not an open "
            "connection or something that holds one"
        ) from exc
    try:
        sample = _sql_sample(sql, connection_factory, sql_params)
    except Exception as exc:  # a bad query or connection, said at the call
        raise PlanError(
            f"read_sql({sql!r}): the query failed on the client, where its first rows are "
            f"read for the columns: {type(exc).__name__}: {exc}; check the query, "
            "sql_params and connection_factory"
        ) from exc
    shards = override_num_blocks or (SQL_DEFAULT_SHARDS if shard_keys else 1)
    queries = [sql]
    if shard_keys and shards > 1:
        queries = _sql_shard_queries(sql, shard_keys, shard_hash_fn, shards)
        try:  # as Ray asks the database whether it shards, on one row of shard 0
            _sql_rows(connection_factory, f"{queries[0]} LIMIT 1", sql_params)
        except Exception as exc:  # any failure means: cannot shard
            if override_num_blocks is not None:
                raise PlanError(
                    f"read_sql(shard_keys={list(shard_keys)!r}, shard_hash_fn="
                    f"{shard_hash_fn!r}, override_num_blocks={override_num_blocks}): the "
                    f"database cannot evaluate the shards ({type(exc).__name__}: {exc}); "
                    "give a shard_hash_fn it has, register one in the connection factory "
                    "(sqlite3: connection.create_function), or override_num_blocks=1"
                ) from exc
            # the error as text: a record holding the exception would keep its frames,
            # and the caller's, alive as long as the record lives
            logger.warning(
                "read_sql: the database cannot evaluate the shards of shard_keys=%r with "
                "shard_hash_fn=%r (%s); reading the query in one task, as Ray does",
                list(shard_keys),
                shard_hash_fn,
                f"{type(exc).__name__}: {exc}",
            )
            queries = [sql]
    empty = sample.iloc[:0]
    with keep_object_columns():  # bytes and other objects stay what they are
        frame = dd.from_map(
            functools.partial(
                _read_sql_block,
                connection_factory=connection_factory,
                sql_params=sql_params,
                empty=empty,
            ),
            queries,
            meta=empty,
            enforce_metadata=False,
        )
    options = {
        "sql": sql,
        "sql_params": sql_params,
        "shard_keys": list(shard_keys) if shard_keys else None,
        "shard_hash_fn": shard_hash_fn,
        "blocks": len(queries),
    }
    return _dataset(frame, "ReadSQL", options=options)
