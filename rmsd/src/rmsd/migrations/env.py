"""Alembic environment: rmsd runs migrations on a connection it already holds (and has locked)."""

from alembic import context

from rmsd.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
