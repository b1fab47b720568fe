"""The embedded Redis used when no URL is configured: starts, serves streams, stops cleanly."""

from __future__ import annotations

import redis

from aisrl.redis_conn import redis_url_or_embedded, start_embedded_redis, sync_client


def test_embedded_redis_serves_consumer_groups_and_stops():
    server = start_embedded_redis()
    client = sync_client(server.url)
    client.xgroup_create("s", "g", id="0", mkstream=True)
    client.xadd("s", {"k": "v"})
    got = client.xreadgroup("g", "c1", {"s": ">"}, count=1)
    assert got[0][1][0][1] == {b"k": b"v"}
    assert client.xpending("s", "g")["pending"] == 1
    client.close()
    server.stop()
    assert server.process.poll() is not None
    assert not server.data_dir.exists()
    try:
        redis.Redis.from_url(server.url, socket_connect_timeout=0.5).ping()
        raise AssertionError("server still answers after stop")
    except redis.ConnectionError:
        pass


def test_given_url_is_used_as_is(redis_url):
    with redis_url_or_embedded(redis_url) as url:
        assert url == redis_url


def test_appendonly_keeps_streams_across_restart(tmp_path):
    with start_embedded_redis(data_dir=tmp_path, appendonly=True) as server:
        client = sync_client(server.url)
        client.xadd("kept", {"a": "1"})
        client.close()
        port = server.port
    with start_embedded_redis(port=port, data_dir=tmp_path, appendonly=True) as server:
        client = sync_client(server.url)
        assert client.xlen("kept") == 1
        client.close()
