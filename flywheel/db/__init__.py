"""The signal store: schema, engine, embedded PostgreSQL and migrations."""
