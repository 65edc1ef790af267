"""PostgreSQL access: query loader, connections, schema management, the task queue."""
