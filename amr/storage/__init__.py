"""PostgreSQL/TimescaleDB access: connections, migrations, time partitioning."""
