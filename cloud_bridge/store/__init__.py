"""The fleet registry, split by concern: `registry.Registry` opens the database (SQLite or PostgreSQL)
and holds one object per concern (`devices`, `commands`, `replies`, `chunks`, `events`, `alerts`,
`feeds`, `retention`, `counters`, `dead_letters`) over one shared connection."""
