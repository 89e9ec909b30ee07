"""The registry's tables, declared once for both dialects, their version and the migrations to it.

`SCHEMA` and the migrations are portable SQL with five dialect words that `render` replaces:

| word | SQLite | PostgreSQL |
|---|---|---|
| `SERIAL_ID` | `INTEGER PRIMARY KEY` (the rowid) | `BIGSERIAL PRIMARY KEY` |
| `BIGINT` | `INTEGER` | `BIGINT` |
| `BOOL` | `INTEGER` | `BOOLEAN` |
| `BYTES` | `BLOB` | `BYTEA` |
| `INSERTION_ORDER` | nothing (every table has a rowid) | `, rowid BIGSERIAL` |

A migration step that only one dialect needs is an `Only`. The version itself is kept by the
backend (SQLite `PRAGMA user_version`, PostgreSQL the `meta` table). Timestamps are stored as
protocol `ts` strings (UTC, milliseconds, `Z`), which sort as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cloud_bridge.errors import BridgeError
from cloud_bridge.store.backends import Backend, Dialect

SCHEMA_VERSION = 8

WORDS: dict[Dialect, dict[str, str]] = {
    "sqlite": {"SERIAL_ID": "INTEGER PRIMARY KEY", "BIGINT": "INTEGER", "BOOL": "INTEGER", "BYTES": "BLOB",
               "INSERTION_ORDER": ""},
    "postgresql": {"SERIAL_ID": "BIGSERIAL PRIMARY KEY", "BIGINT": "BIGINT", "BOOL": "BOOLEAN", "BYTES": "BYTEA",
                   "INSERTION_ORDER": ", rowid BIGSERIAL"},
}
_WORD = re.compile(r"\b(" + "|".join(WORDS["sqlite"]) + r")\b")

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    state TEXT,                 -- online | offline | NULL: never reported status
    since TEXT,                 -- when `state` last changed
    last_seen TEXT,             -- last message of any kind from the device
    agent_version TEXT,
    model_name TEXT,
    model_sha256 TEXT,
    n_gpu_layers BIGINT,
    claimed_groups TEXT,        -- JSON list: the groups its last online Status announced (a hint, see device_groups)
    kinds TEXT,                 -- JSON list
    last_telemetry TEXT,        -- JSON object
    policy TEXT,                -- JSON object: the policy in force (output of the last `config` command)
    status_ts TEXT,             -- `ts` of the newest timestamped Status applied (older ones are replays)
    previous_model_name TEXT,   -- the model a `model` rollback would return to (Status `previous_model`)
    previous_model_sha256 TEXT,
    rollout TEXT                -- the rollout of the last deploy that changed the model (Status `rollout`)
);
CREATE TABLE IF NOT EXISTS device_states (
    id SERIAL_ID,
    device_id TEXT NOT NULL,
    state TEXT NOT NULL,
    ts TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS commands (
    id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,      -- the exact Command JSON that is published
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    expires_at TEXT,
    last_sent_at TEXT,
    updated_at TEXT NOT NULL,
    reply TEXT,                 -- the terminal Reply JSON
    error TEXT,                 -- {"code", "message"}: from the terminal reply, or the bridge's own
    priority INTEGER NOT NULL DEFAULT 0,
    batch TEXT,                 -- the fan-out this command belongs to (a group or a filter), or NULL
    wire_id TEXT                -- the id the device sees: `id`, or the group command's id for a member row
    INSERTION_ORDER             -- ties of created_at are broken by insertion order
);
CREATE INDEX IF NOT EXISTS commands_by_state ON commands (state);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device_id, created_at);
CREATE TABLE IF NOT EXISTS replies (
    id SERIAL_ID,
    device_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    command_id TEXT,
    status TEXT NOT NULL,
    payload TEXT NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (device_id, seq)
);
CREATE INDEX IF NOT EXISTS replies_by_command ON replies (command_id);
CREATE TABLE IF NOT EXISTS stream_chunks (
    id SERIAL_ID,
    device_id TEXT NOT NULL,
    command_id TEXT NOT NULL,
    idx BIGINT NOT NULL,
    delta TEXT NOT NULL,
    done BOOL NOT NULL,
    received_at TEXT NOT NULL,
    UNIQUE (device_id, command_id, idx)  -- devices answering one group command share its id
);
CREATE TABLE IF NOT EXISTS events (
    id SERIAL_ID,
    device_id TEXT NOT NULL,
    ts TEXT NOT NULL,
    level TEXT NOT NULL,
    code TEXT NOT NULL,
    message TEXT NOT NULL,
    data TEXT NOT NULL,
    received_at TEXT NOT NULL,
    dedupe_key TEXT             -- sha256 of the Event: a redelivered event is stored once
);
CREATE UNIQUE INDEX IF NOT EXISTS events_dedupe ON events (dedupe_key);
CREATE INDEX IF NOT EXISTS commands_by_batch ON commands (batch);
CREATE INDEX IF NOT EXISTS commands_by_wire_id ON commands (wire_id, device_id);
CREATE TABLE IF NOT EXISTS alerts (
    id SERIAL_ID,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,         -- offline | error_rate | outbox_growing | tokens_per_s_drop | group_mismatch
                                -- | dead_letters (device '*')
    message TEXT NOT NULL,
    raised_at TEXT NOT NULL,
    cleared_at TEXT,            -- NULL while the condition holds
    acknowledged_at TEXT,       -- when an operator took it (console, API), NULL until then
    acknowledged_by TEXT        -- the token's name that acknowledged it
);
CREATE UNIQUE INDEX IF NOT EXISTS alerts_open ON alerts (device_id, kind) WHERE cleared_at IS NULL;
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id SERIAL_ID,
    device_id TEXT,             -- the device of the topic, NULL when the topic names none
    topic TEXT NOT NULL,
    payload BYTES NOT NULL,     -- the payload as received (its first MAX_PAYLOAD_BYTES)
    size BIGINT NOT NULL,       -- the payload's whole size in bytes
    error TEXT NOT NULL,        -- why it was not stored
    received_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_by_time ON dead_letters (received_at);
CREATE TABLE IF NOT EXISTS alert_deliveries (
    id SERIAL_ID,
    alert_id BIGINT NOT NULL,
    event TEXT NOT NULL,        -- raised | cleared
    webhook TEXT NOT NULL,      -- the [[alerts.webhooks]] url it goes to
    format TEXT NOT NULL,       -- alertmanager | json
    payload TEXT NOT NULL,      -- the exact JSON body posted
    state TEXT NOT NULL,        -- pending | delivered | failed (gave up after give_up_after_s)
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    created_at TEXT NOT NULL,
    next_attempt_at TEXT NOT NULL,
    delivered_at TEXT
);
CREATE INDEX IF NOT EXISTS alert_deliveries_due ON alert_deliveries (state, next_attempt_at);
CREATE TABLE IF NOT EXISTS api_tokens (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,         -- viewer | operator | admin
    token_sha256 TEXT NOT NULL, -- hex SHA-256 of the token (the token itself is never stored)
    created_at TEXT NOT NULL,
    last_used_at TEXT
);
CREATE TABLE IF NOT EXISTS audit_log (
    id SERIAL_ID,
    ts TEXT NOT NULL,
    actor TEXT NOT NULL,        -- a token's name, or cli:<unix user>
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL       -- ok, or the error
);
CREATE TABLE IF NOT EXISTS models (
    sha256 TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size BIGINT NOT NULL,
    url TEXT,                   -- a mirror devices download from, or NULL: the bridge serves [models] dir/<sha256>.gguf
    architecture TEXT,          -- from the GGUF header
    quantization TEXT,
    parameters BIGINT,
    context_length BIGINT,
    added_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollouts (
    id TEXT PRIMARY KEY,
    model_name TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    target TEXT NOT NULL,       -- what was asked: group/G, a device, or a filter's label
    waves TEXT NOT NULL,        -- JSON list of cumulative percentages, e.g. [5, 25, 100]
    max_failures BIGINT NOT NULL,
    canary TEXT,                -- JSON object: the deploy command's `canary`, or NULL
    state TEXT NOT NULL,        -- running | paused | halted | aborted | completed | rolled_back
    wave BIGINT NOT NULL,       -- the wave in progress (0-based)
    reason TEXT,                -- why it halted, was aborted or rolled back
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_devices (
    rollout_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    wave BIGINT NOT NULL,
    state TEXT NOT NULL,        -- waiting | queued | activated | unchanged | rolled_back | download_failed | failed
                                -- | timed_out | cancelled
    command_id TEXT,            -- the deploy command's row
    phase TEXT,                 -- the last model_progress phase: download | verify | load | canary
    percent REAL,
    bytes BIGINT,
    total BIGINT,
    canary TEXT,                -- JSON: the reply's canary summary
    reason TEXT,
    rollback TEXT,              -- NULL | wanted | queued | done | failed: the bridge's `model` rollback
    rollback_command_id TEXT,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (rollout_id, device_id)
);
CREATE TABLE IF NOT EXISTS device_groups (  -- group membership as the cloud assigns it: the only one routing uses
    device_id TEXT NOT NULL,
    group_name TEXT NOT NULL,
    assigned_at TEXT NOT NULL,
    PRIMARY KEY (device_id, group_name)
);
CREATE INDEX IF NOT EXISTS device_groups_by_group ON device_groups (group_name);
"""


@dataclass(frozen=True)
class Only:
    """A migration step that one dialect needs and the other does not."""

    dialect: Dialect
    sql: str


# Upgrades of an existing registry, by the version they lead to. Applied in order, in one transaction.
MIGRATIONS: dict[int, tuple[str | Only, ...]] = {
    2: (
        "ALTER TABLE devices ADD COLUMN policy TEXT",
        "ALTER TABLE commands ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE commands ADD COLUMN batch TEXT",
        "ALTER TABLE commands ADD COLUMN wire_id TEXT",
        "UPDATE commands SET wire_id = id",
        "ALTER TABLE stream_chunks RENAME TO stream_chunks_v1",
        """CREATE TABLE stream_chunks (
    id SERIAL_ID, device_id TEXT NOT NULL, command_id TEXT NOT NULL, idx INTEGER NOT NULL,
    delta TEXT NOT NULL, done BOOL NOT NULL, received_at TEXT NOT NULL, UNIQUE (device_id, command_id, idx)
)""",
        "INSERT INTO stream_chunks SELECT * FROM stream_chunks_v1",
        Only("postgresql", "SELECT setval(pg_get_serial_sequence('stream_chunks', 'id'), max(id)) FROM stream_chunks"),
        "DROP TABLE stream_chunks_v1",
    ),
    3: (  # the `dead_letters` table and the `events_dedupe` index come from SCHEMA (create() runs after)
        "ALTER TABLE devices ADD COLUMN status_ts TEXT",
        "ALTER TABLE events ADD COLUMN dedupe_key TEXT",
        Only("postgresql", "ALTER TABLE stream_chunks ALTER COLUMN idx TYPE BIGINT"),
        Only("postgresql", "ALTER TABLE devices ALTER COLUMN n_gpu_layers TYPE BIGINT"),
    ),
    4: (),  # the `alert_deliveries` table (webhook outbox and delivery log) comes from SCHEMA
    5: (),  # access: the `api_tokens` and `audit_log` tables come from SCHEMA (create() runs after)
    6: (  # issue #14: the `models`, `rollouts` and `rollout_devices` tables come from SCHEMA
        "ALTER TABLE devices ADD COLUMN previous_model_name TEXT",
        "ALTER TABLE devices ADD COLUMN previous_model_sha256 TEXT",
        "ALTER TABLE devices ADD COLUMN rollout TEXT",
    ),
    7: (  # alert acknowledgement (console, POST /api/alerts/{id}/acknowledge); a registry from before alerts
        # existed gets their version-5 table first
        "CREATE TABLE IF NOT EXISTS alerts (id SERIAL_ID, device_id TEXT NOT NULL, kind TEXT NOT NULL, "
        "message TEXT NOT NULL, raised_at TEXT NOT NULL, cleared_at TEXT)",
        "ALTER TABLE alerts ADD COLUMN acknowledged_at TEXT",
        "ALTER TABLE alerts ADD COLUMN acknowledged_by TEXT",
    ),
    8: (  # the `device_groups` table comes from SCHEMA; it starts empty (`cloud-bridge group import-claimed`)
        "ALTER TABLE devices RENAME COLUMN groups TO claimed_groups",
    ),
}


def render(sql: str, dialect: Dialect) -> list[str]:
    """The statements of portable `sql` (separated by `;`) in `dialect`."""
    words = WORDS[dialect]
    text = _WORD.sub(lambda match: words[match[1]], sql)
    return [statement.strip() for statement in text.split(";") if statement.strip()]


def create(backend: Backend) -> None:
    """Create every table and index that is missing and stamp the schema with SCHEMA_VERSION."""
    for statement in render(SCHEMA, backend.dialect):
        backend.execute(statement)
    backend.set_schema_version(SCHEMA_VERSION)


def migrate(backend: Backend, found: int) -> None:
    """Bring a registry at version `found` (>= 1) to SCHEMA_VERSION; the caller holds `backend.exclusive()`."""
    for target in range(found + 1, SCHEMA_VERSION + 1):
        for step in MIGRATIONS[target]:
            if isinstance(step, Only) and step.dialect != backend.dialect:
                continue
            for statement in render(step.sql if isinstance(step, Only) else step, backend.dialect):
                backend.execute(statement)
    create(backend)


def bring_up_to_date(backend: Backend, *, create_if_empty: bool) -> None:
    """Check the schema version and migrate an older registry in place, under the schema lock.

    A database without a version gets the whole schema when `create_if_empty` (a new PostgreSQL
    database); otherwise it is refused (an SQLite file of another program). A newer version is
    refused: this cloud-bridge would not understand it.
    """
    if backend.schema_version() == SCHEMA_VERSION:
        return
    with backend.exclusive():
        found = backend.schema_version()
        if found > SCHEMA_VERSION:
            raise BridgeError(f"the registry {backend.label} has schema version {found}, newer than this "
                              f"cloud-bridge understands ({SCHEMA_VERSION}); upgrade cloud-bridge")
        if found == 0 and not create_if_empty:
            raise BridgeError(f"{backend.label} is not a cloud-bridge registry (no schema version); check [store] "
                              "path in the config: it must not point at another program's database")
        if found == 0:
            create(backend)
        elif found < SCHEMA_VERSION:
            migrate(backend, found)
