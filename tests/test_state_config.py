"""[edge.state]: defaults that need nothing, and mistakes named by file, key and reason."""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tunneld.config import load_edge_config
from tunneld.config.values import RedisTarget, parse_address, parse_redis_url
from tunneld.errors import ConfigError
from tunneld.state import make_backend


class StateConfigTests(SynchronousTestCase):
    def load(self, text: str) -> object:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        self.path = path
        return load_edge_config(path)

    def assert_error(self, text: str, key: str, reason: str) -> None:
        with self.assertRaises(ConfigError) as raised:
            self.load(text)
        message = str(raised.exception)
        self.assertTrue(message.startswith(f"{self.path}: {key}: "), message)
        self.assertIn(reason, message)

    def test_default_needs_no_redis(self) -> None:
        """Without a file, and with an [edge] table alone, state is in memory."""
        self.assertEqual(load_edge_config(None).edge.state.backend, "memory")
        config: object = self.load('[edge]\npublic_listen = ["tcp:0"]\n')
        self.assertEqual(config.edge.state.backend, "memory")  # type: ignore[attr-defined]

    def test_redis_and_sentinel_settings(self) -> None:
        """A Sentinel setup loads, and make_backend builds the Redis backend from it (unconnected)."""
        config: object = self.load(
            "[edge.state]\nbackend = \"redis\"\nredis_url = \"redis://:pw@ignored/3\"\n"
            "sentinels = [\"10.0.0.1:26379\", \"[::1]:26380\", \"sentinel-3\"]\n"
            "sentinel_master = \"main\"\nedge_ttl = 9.0\nheartbeat_interval = 3.0\n"
        )
        state = config.edge.state  # type: ignore[attr-defined]
        self.assertEqual(state.sentinels[1], "[::1]:26380")
        from tunneld.state.redis import RedisStateBackend

        backend = make_backend(Clock(), state)
        self.assertIsInstance(backend, RedisStateBackend)
        client = backend.client  # type: ignore[attr-defined]
        self.assertEqual(
            client.sentinels, (("10.0.0.1", 26379), ("::1", 26380), ("sentinel-3", 26379))
        )
        self.assertEqual((client.target.password, client.target.db), ("pw", 3))
        self.assertEqual(client.where, "sentinel master 'main' via 10.0.0.1:26379,[::1]:26380,sentinel-3:26379")

    def test_mistakes(self) -> None:
        """Each wrong value stops the start naming the file, the key and the reason."""
        self.assert_error("[edge.state]\nbackend = \"etcd\"\n", "edge.state.backend",
                          "must be 'memory' or 'redis', got 'etcd'")
        self.assert_error("[edge.state]\nredis_url = \"http://h\"\n", "edge.state.redis_url",
                          "the scheme must be redis, rediss or unix")
        self.assert_error("[edge.state]\nredis_url = \"redis://h:99999\"\n",
                          "edge.state.redis_url", "not a Redis URL")
        self.assert_error("[edge.state]\nredis_url = \"redis://h/zero\"\n",
                          "edge.state.redis_url", "the database must be a number")
        self.assert_error("[edge.state]\nsentinels = [\"h:x\"]\n", "edge.state.sentinels",
                          "not a port")
        self.assert_error("[edge.state]\nedge_ttl = \"long\"\n", "edge.state.edge_ttl",
                          "expected a number")
        self.assert_error("[edge.state]\nedge_ttl = 0\n", "edge.state.edge_ttl",
                          "must be greater than 0")
        self.assert_error("[edge.state]\nredis = \"x\"\n", "edge.state.redis", "unknown key")
        self.assert_error("[edge.state]\nkey_prefix = \"\"\n", "edge.state.key_prefix",
                          "must not be empty")

    def test_mistakes_across_keys(self) -> None:
        """Settings that contradict each other are refused with the key that is wrong."""
        self.assert_error("[edge.state]\nsentinels = [\"h:1\"]\nsentinel_master = \"m\"\n",
                          "edge.state", "need backend = \"redis\"")
        self.assert_error("[edge.state]\nbackend = \"redis\"\nsentinels = [\"h:1\"]\n",
                          "edge.state", "sentinel_master: required with sentinels")
        self.assert_error("[edge.state]\nbackend = \"redis\"\nsentinel_master = \"m\"\n",
                          "edge.state", "sentinel_master: needs sentinels")
        self.assert_error(
            "[edge.state]\nbackend = \"redis\"\nsentinels = [\"h:1\"]\nsentinel_master = \"m\"\n"
            "redis_url = \"rediss://h\"\n",
            "edge.state", "TLS (rediss://) is not supported with sentinels",
        )
        self.assert_error("[edge.state]\nedge_ttl = 10.0\nheartbeat_interval = 5.0\n",
                          "edge.state", "must be under half of edge_ttl")


class RedisURLTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """redis://, rediss:// and unix: URLs, with credentials and databases."""
        self.assertEqual(parse_redis_url("redis://127.0.0.1"), RedisTarget("redis", "127.0.0.1"))
        self.assertEqual(
            parse_redis_url("rediss://user:p%40ss@[::1]:6380/2"),
            RedisTarget("rediss", "::1", 6380, db=2, username="user", password="p@ss"),
        )
        self.assertEqual(
            parse_redis_url("unix:///run/redis/redis.sock?db=4"),
            RedisTarget("unix", path="/run/redis/redis.sock", db=4),
        )
        self.assertEqual(parse_redis_url("redis://:secret@h").password, "secret")

    def test_descriptions_hide_the_password(self) -> None:
        """What the logs say of a target never holds its password."""
        target = parse_redis_url("redis://user:secret@[::1]:6380/2")
        self.assertEqual(target.describe(), "redis://[::1]:6380/2")
        self.assertNotIn("secret", parse_redis_url("unix:///s?db=1").describe() + target.describe())

    def test_addresses(self) -> None:
        """host:port, bare host (the Sentinel port), [v6]:port; anything else says what is wrong."""
        self.assertEqual(parse_address("h:1"), ("h", 1))
        self.assertEqual(parse_address("h"), ("h", 26379))
        self.assertEqual(parse_address("[::1]:2"), ("::1", 2))
        self.assertEqual(parse_address("[::1]"), ("::1", 26379))
        for bad in ("", "h:0", "h:x", "[::1]x", "a b:1"):
            with self.assertRaises(ValueError):
                parse_address(bad)
