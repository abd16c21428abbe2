"""
The varied workloads of the benchmark: a site that looks like a real one and
requests that differ the way real traffic does (issue 23).

This module is the one description of both.  It writes the upstream's files
(about 200 of 100 B to 8 KB, several content types), the nginx locations that
serve them (every response with its own ``Set-Cookie`` and request id, the
``/pages/`` ones chunked), and each workload as data: a Lua table for
``bench/varied.lua`` (wrk) and JSON for ``bench/pyload.py`` (the smoke mode's
load loop).  Both load generators build every request with the same
algorithm and the same xorshift32 generator, so for one seed they send the
same requests byte for byte (a test runs wrk against L{RequestGenerator}),
and every system in a run gets exactly the same sequence.

Per request (see L{RequestGenerator.next_request}): a target drawn from a
Zipf-weighted table of paths and query strings (some with a per-request cache
buster), a client profile (browser, mobile app, API client, curl, crawler:
its user agent and header set), its own cookie and W3C ``traceparent`` (API
clients also a bearer token), ``Connection: close`` for a share of requests,
and, for a share, a POST with a body of one of several sizes.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from typing import Any

SEED = 23
MASK32 = 0xFFFFFFFF

# -- the site ---------------------------------------------------------------------------

CONTENT_TYPES = {
    "html": "text/html",
    "css": "text/css",
    "js": "application/javascript",
    "json": "application/json",
    "svg": "image/svg+xml",
    "png": "image/png",
    "woff2": "font/woff2",
    "txt": "text/plain",
    "xml": "application/xml",
    "ico": "image/x-icon",
}

# (directory, name stem, extension, how many, smallest, largest)
SITE_PLAN = [
    ("static/css", "app", "css", 12, 1500, 8192),
    ("static/js", "chunk", "js", 40, 600, 8192),
    ("img/icons", "icon", "svg", 30, 300, 3000),
    ("img", "thumb", "png", 30, 1000, 8192),
    ("fonts", "inter", "woff2", 4, 5000, 8192),
    ("api/v1/items", "item", "json", 50, 100, 2000),
    ("pages", "page", "html", 20, 2000, 8192),
    ("data", "notes", "txt", 10, 100, 4000),
]
SINGLE_FILES = [("robots.txt", 120), ("favicon.ico", 1150), ("sitemap.xml", 2400)]

# The per-response token nginx's SSI fills in (and bench/pyupstream.py too):
# it makes the /pages/ responses differ each time and go out chunked.
SSI_REQUEST_ID = '<!--# echo var="request_id" -->'

WORDS = ("tunnel edge agent stream proxy reactor deferred protocol transport frame header body cookie "
         "session request response latency window credit health route policy drain listener").split()


@dataclass(frozen=True)
class SiteFile:
    path: str  # URL path, also the file's place under the www root
    content_type: str
    size: int
    chunked: bool  # served through SSI: chunked, with a per-response token


def _text(rng: random.Random, size: int) -> bytes:
    out: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        out.append(word)
        length += len(word) + 1
    return " ".join(out).encode()[:size]


def _body(rng: random.Random, ext: str, size: int) -> bytes:
    if ext == "png":
        return b"\x89PNG\r\n\x1a\n" + rng.randbytes(max(0, size - 8))
    if ext == "woff2":
        return b"wOF2" + rng.randbytes(max(0, size - 4))
    if ext == "html":
        head = (f'<!doctype html><html><head><meta charset="utf-8"><title>{rng.choice(WORDS)}</title>'
                f'<meta name="csrf-token" content="{SSI_REQUEST_ID}"></head><body><p>').encode()
        tail = b"</p></body></html>\n"
        return head + _text(rng, max(0, size - len(head) - len(tail))) + tail
    if ext == "json":
        text = _text(rng, max(0, size - 20)).decode()
        return json.dumps({"id": rng.randrange(10 ** 6), "text": text}).encode()[:size]
    return _text(rng, size)


def site_files(seed: int = SEED) -> list[SiteFile]:
    """The varied site's files, in a fixed order (most popular first), without writing anything."""
    return [SiteFile(path, ctype, len(data), chunked) for path, ctype, data, chunked in _site(seed)]


def _site(seed: int) -> list[tuple[str, str, bytes, bool]]:
    rng = random.Random(seed)
    files: list[tuple[str, str, bytes, bool]] = []
    for directory, stem, ext, count, low, high in SITE_PLAN:
        for i in range(count):
            # Sizes spread evenly on a log scale between the bounds (100 B to 8 KB overall).
            size = int(math.exp(rng.uniform(math.log(low), math.log(high))))
            digest = f"{rng.getrandbits(32):08x}"
            name = f"{stem}-{i}.{digest}.{ext}" if directory.startswith("static") else f"{stem}-{i}.{ext}"
            files.append((f"/{directory}/{name}", CONTENT_TYPES[ext], _body(rng, ext, size), ext == "html"))
    for name, size in SINGLE_FILES:
        ext = name.rsplit(".", 1)[1]
        files.append((f"/{name}", CONTENT_TYPES[ext], _body(rng, ext, size), False))
    # Popularity order: a fixed shuffle, so no one kind of file is all at the head.
    rng.shuffle(files)
    return files


# What a POST is answered with: to /api/ (200), to /upload/ (201).
ANSWERS = {"ok.json": b'{"ok":true}\n', "stored.json": b'{"stored":true}\n'}


def write_site(www: str, seed: int = SEED) -> list[SiteFile]:
    """Write the varied site under C{www} (beside the static workload's files)."""
    os.makedirs(os.path.join(www, "_answer"), exist_ok=True)
    for name, answer in ANSWERS.items():
        with open(os.path.join(www, "_answer", name), "wb") as f:
            f.write(answer)
    out = []
    for path, ctype, data, chunked in _site(seed):
        full = os.path.join(www, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
        out.append(SiteFile(path, ctype, len(data), chunked))
    return out


# The response header sets, by kind of location, as a real site behind a proxy sends them;
# nginx adds Server, Date, Content-Type, Content-Length or chunked, Last-Modified, ETag,
# Accept-Ranges itself.  Each response gets its own cookie and request id.
COMMON_RESPONSE_HEADERS = [
    ("Set-Cookie", 'sid=$request_id; Path=/; Max-Age=86400; HttpOnly; SameSite=Lax'),
    ("X-Request-Id", "$request_id"),
    ("X-Content-Type-Options", "nosniff"),
    ("Strict-Transport-Security", "max-age=31536000; includeSubDomains"),
    ("Referrer-Policy", "strict-origin-when-cross-origin"),
]
RESPONSE_HEADERS = {
    "asset": [("Cache-Control", "public, max-age=31536000, immutable"), ("Vary", "Accept-Encoding"),
              *COMMON_RESPONSE_HEADERS],
    "page": [("Cache-Control", "no-cache, private"), ("Vary", "Accept-Encoding, Cookie"),
             ("X-Frame-Options", "SAMEORIGIN"),
             ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; script-src 'self'; "
              "style-src 'self' 'unsafe-inline'; frame-ancestors 'self'; base-uri 'self'"),
             *COMMON_RESPONSE_HEADERS],
    "api": [("Cache-Control", "private, max-age=0, must-revalidate"), ("Vary", "Accept, Authorization"),
            *COMMON_RESPONSE_HEADERS],
}


def nginx_locations(www: str) -> str:
    """The upstream's server-block locations for the varied site (the static files keep theirs)."""

    def headers(kind: str) -> str:
        return "".join(f"      add_header {name} \"{value}\" always;\n" for name, value in RESPONSE_HEADERS[kind])

    types = " ".join(f"{ctype} {ext};" for ext, ctype in CONTENT_TYPES.items())
    return f"""    root {www};
    client_max_body_size 8m;
    types {{ {types} }}
    location = /small {{ }}
    location = /1m {{ }}
    location = /big {{ }}
    location /pages/ {{
      ssi on;
{headers("page")}    }}
    location /api/v1/items/ {{
{headers("api")}    }}
    # POSTs: like an application, read the whole body before answering (nginx's
    # "return" answers at once and leaves the body unread: an upload row would
    # then count bytes nobody received).  mirror_request_body reads it; the
    # missing file's 404 becomes the answer.
    location /api/ {{
      client_body_buffer_size 64k;
      mirror /_drop;
      mirror_request_body on;
      log_not_found off;
      error_page 404 405 =200 /_answer/ok.json;
    }}
    location /upload/ {{
      client_body_buffer_size 2m;
      mirror /_drop;
      mirror_request_body on;
      log_not_found off;
      error_page 404 405 =201 /_answer/stored.json;
    }}
    location = /_drop {{ internal; return 204; }}
    location /_answer/ {{
      internal;
{headers("api")}    }}
    location / {{
{headers("asset")}    }}
"""


# -- the requests -----------------------------------------------------------------------

# Client profiles: (weight, header lines after Host and before the Cookie, sends
# "Connection: keep-alive", sends a bearer token).  The lines are what each client sends.
PROFILES: list[tuple[int, str, bool, bool]] = [
    (40, 'sec-ch-ua: "Chromium";v="124", "Google Chrome";v="124", "Not-A.Brand";v="99"\r\n'
         "sec-ch-ua-mobile: ?0\r\n"
         'sec-ch-ua-platform: "Windows"\r\n'
         "Upgrade-Insecure-Requests: 1\r\n"
         "User-Agent: Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
         "Chrome/124.0.0.0 Safari/537.36\r\n"
         "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
         "image/apng,*/*;q=0.8,application/signed-exchange;v=b3;q=0.7\r\n"
         "Sec-Fetch-Site: same-origin\r\n"
         "Sec-Fetch-Mode: navigate\r\n"
         "Sec-Fetch-User: ?1\r\n"
         "Sec-Fetch-Dest: document\r\n"
         "Referer: http://bench.localhost/pages/page-0.html\r\n"
         "Accept-Encoding: gzip, deflate, br\r\n"
         "Accept-Language: en-US,en;q=0.9\r\n", True, False),
    (20, "User-Agent: Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
         "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1\r\n"
         "Accept: */*\r\n"
         "Accept-Language: fr-FR,fr;q=0.9\r\n"
         "Referer: http://bench.localhost/\r\n"
         "Accept-Encoding: gzip, deflate\r\n", True, False),
    (10, "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0\r\n"
         "Accept: text/css,*/*;q=0.1\r\n"
         "Accept-Language: en-GB,en;q=0.7,de;q=0.3\r\n"
         "Accept-Encoding: gzip, deflate, br\r\n"
         "Referer: http://bench.localhost/pages/page-3.html\r\n"
         "DNT: 1\r\n"
         "Sec-Fetch-Dest: style\r\n"
         "Sec-Fetch-Mode: no-cors\r\n"
         "Sec-Fetch-Site: same-origin\r\n", True, False),
    (12, "User-Agent: okhttp/4.12.0\r\n"
         "Accept: application/json\r\n"
         "Accept-Encoding: gzip\r\n"
         "X-App-Version: 5.14.2 (5140200)\r\n"
         "X-Platform: android-34\r\n", True, True),
    (8, "User-Agent: python-requests/2.31.0\r\n"
        "Accept-Encoding: gzip, deflate\r\n"
        "Accept: */*\r\n", True, True),
    (5, "User-Agent: curl/8.5.0\r\n"
        "Accept: */*\r\n", False, False),
    (5, "User-Agent: Mozilla/5.0 (compatible; ExampleBot/2.1; +http://bench.localhost/bot.html)\r\n"
        "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
        "Accept-Encoding: gzip, deflate, br\r\n"
        "From: bot@bench.localhost\r\n", False, False),
]

# POST targets: (weight, path, content type).
POST_TARGETS = [
    (5, "/api/v1/events", "application/json"),
    (3, "/api/v1/orders?idempotent=1", "application/json"),
    (2, "/api/v1/session/refresh", "application/x-www-form-urlencoded"),
    (2, "/api/v1/search", "application/json"),
]
UPLOAD_TARGETS = [(1, "/upload/photo", "application/octet-stream"),
                  (1, "/upload/backup?chunk=0", "application/octet-stream")]
BODY_PATTERN = ('{"event":"click","target":"#buy","ts":1700000000,"props":{"plan":"pro","seats":3},'
                '"ctx":{"lang":"en-US","tz":"Europe/Berlin"}}\n')


@dataclass(frozen=True)
class Workload:
    """One varied workload: what varies and in what proportions."""

    name: str
    description: str
    close_permille: int = 50  # requests that say Connection: close (the client then reconnects)
    post_permille: int = 0  # requests that are POSTs (the rest GET the site)
    post_sizes: tuple[tuple[int, int], ...] = ()  # (weight, body bytes)
    uploads: bool = False  # POSTs go to /upload/ (the 1 MiB rows) instead of the API


WORKLOADS = {
    "varied": Workload("varied", "GETs of the varied site"),
    "post4k": Workload("post4k", "POSTs with 4 KiB bodies", post_permille=1000, post_sizes=((1, 4096),)),
    "mixed": Workload("mixed", "GETs with 15 % POSTs of 256 B to 16 KiB", post_permille=150,
                      post_sizes=((4, 256), (3, 1024), (2, 4096), (1, 16384))),
    "up1m": Workload("up1m", "POSTs with 1 MiB bodies", close_permille=0, post_permille=1000,
                     post_sizes=((1, 1 << 20),), uploads=True),
}


def _targets(files: list[SiteFile], rng: random.Random, slots: int = 2000) -> list[str]:
    """Request targets with query strings, repeated by a Zipf-like popularity."""
    variants: list[str] = []
    for f in files:
        if f.path.startswith("/static/"):
            options = [f"?v={rng.getrandbits(32):08x}"]
        elif f.path.startswith("/pages/"):
            options = ["", f"?utm_source=newsletter&utm_medium=email&utm_campaign=spring-{rng.randrange(9)}",
                       f"?page={rng.randrange(2, 40)}", f"?q={rng.choice(WORDS)}+{rng.choice(WORDS)}&sort=recent"]
        elif f.path.startswith("/api/"):
            # A trailing "_=" gets a per-request cache-buster (as jQuery's cache: false).
            options = [f"?fields=id,name,price&limit={rng.choice((10, 20, 50))}", "?_="]
        else:
            options = [""]
        variants.extend(f.path + option for option in options)
    weights = [1 / (rank + 1) ** 0.9 for rank in range(len(variants))]
    total = sum(weights)
    table: list[str] = []
    for target, weight in zip(variants, weights, strict=True):
        table.extend([target] * max(1, round(weight / total * slots)))
    return table


def _pick(weighted: list[tuple[int, Any]]) -> list[Any]:
    return [item for weight, item in weighted for _ in range(weight)]


def workload_data(name: str, vhost: str, seed: int = SEED) -> dict[str, Any]:
    """Everything a load generator needs to build C{name}'s requests (JSON-able)."""
    spec = WORKLOADS[name]
    rng = random.Random(seed)
    posts = UPLOAD_TARGETS if spec.uploads else POST_TARGETS
    return {
        "name": spec.name,
        "description": spec.description,
        "seed": seed,
        "vhost": vhost,
        "close_permille": spec.close_permille,
        "post_permille": spec.post_permille,
        "targets": _targets(site_files(seed), rng),
        "profiles": [{"head": head, "keepalive": keepalive, "auth": auth}
                     for _, head, keepalive, auth in PROFILES],
        "profile_pick": _pick([(w, i) for i, (w, *_rest) in enumerate(PROFILES)]),
        "posts": [{"path": path, "type": ctype} for _, path, ctype in posts],
        "post_pick": _pick([(w, i) for i, (w, *_rest) in enumerate(posts)]),
        "sizes": _pick(list(spec.post_sizes)),
        "body_pattern": BODY_PATTERN,
    }


def _lua(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(c if c.isalnum() or c in " -_./:;,=?*+()'#!@[]{}<>&%~^|$" else f"\\{ord(c):03d}"
                             for c in value) + '"'
    if isinstance(value, list):
        return "{" + ",".join(_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}={_lua(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua for {value!r}")


def write_workload(directory: str, name: str, vhost: str, seed: int = SEED) -> tuple[str, str]:
    """Write C{name} as C{name}.lua (for bench/varied.lua) and C{name}.json; return both paths."""
    data = workload_data(name, vhost, seed)
    lua_path = os.path.join(directory, f"workload-{name}.lua")
    json_path = os.path.join(directory, f"workload-{name}.json")
    with open(lua_path, "w") as f:
        f.write("return " + _lua(data) + "\n")
    with open(json_path, "w") as f:
        json.dump(data, f)
    return lua_path, json_path


class RequestGenerator:
    """
    The reference request builder: bench/varied.lua does exactly this, so
    that wrk and the Python load loop send the same bytes for one seed.
    """

    def __init__(self, data: dict[str, Any], thread: int = 0, close_permille: int | None = None) -> None:
        self.data = data
        self.x = (data["seed"] + thread * 7919) & MASK32 or 1
        self.n = 0
        self.close_permille = data["close_permille"] if close_permille is None else close_permille
        self._bodies: dict[int, bytes] = {}

    def next32(self) -> int:
        """xorshift32: the same numbers LuaJIT's bit library makes in bench/varied.lua."""
        x = self.x
        x ^= (x << 13) & MASK32
        x ^= x >> 17
        x ^= (x << 5) & MASK32
        self.x = x
        return x

    def pick(self, table: list[Any]) -> Any:
        return table[self.next32() % len(table)]

    def hex8(self) -> str:
        return f"{self.next32():08x}"

    def body(self, size: int) -> bytes:
        body = self._bodies.get(size)
        if body is None:
            pattern = self.data["body_pattern"].encode()
            body = self._bodies[size] = (pattern * (size // len(pattern) + 1))[:size]
        return body

    def next_request(self) -> tuple[bytes, bool]:
        """The next request's bytes, and whether it asks the server to close."""
        d = self.data
        self.n += 1
        n = self.n
        close = self.next32() % 1000 < self.close_permille
        is_post = self.next32() % 1000 < d["post_permille"]
        if is_post:
            post = d["posts"][self.pick(d["post_pick"])]
            size = self.pick(d["sizes"])
            line = f"POST {post['path']} HTTP/1.1\r\n"
        else:
            target = self.pick(d["targets"])
            if target.endswith("_="):
                target += str(1700000000 + n)
            line = f"GET {target} HTTP/1.1\r\n"
        profile = d["profiles"][self.pick(d["profile_pick"])]
        sid = self.hex8() + self.hex8() + self.hex8()
        ga = self.next32() % 1000000000
        trace = self.hex8() + self.hex8() + self.hex8() + f"{n & MASK32:08x}"
        span = self.hex8() + self.hex8()
        parts = [line, f"Host: {d['vhost']}\r\n", profile["head"],
                 f"Cookie: sid={sid}; _ga=GA1.1.{ga}.{1700000000 + n}; theme=light\r\n",
                 f"traceparent: 00-{trace}-{span}-01\r\n"]
        if profile["auth"]:
            parts.append(f"Authorization: Bearer {self.hex8()}{self.hex8()}{self.hex8()}{self.hex8()}\r\n")
        if is_post:
            parts.append(f"Content-Type: {post['type']}\r\nContent-Length: {size}\r\n")
        if close:
            parts.append("Connection: close\r\n")
        elif profile["keepalive"]:
            parts.append("Connection: keep-alive\r\n")
        parts.append("\r\n")
        head = "".join(parts).encode("latin-1")
        return (head + self.body(size) if is_post else head), close


def load_workload(path: str) -> dict[str, Any]:
    with open(path) as f:
        data: dict[str, Any] = json.load(f)
    return data


def h2_uris(data: dict[str, Any], base: str, count: int = 1000) -> list[str]:
    """Distinct GET targets in popularity order, for h2load's -i (it sends the same headers each time)."""
    seen: dict[str, None] = {}
    for target in data["targets"]:
        seen.setdefault(target.replace("?_=", "?_=1700000000"), None)
    return [base + target for target in list(seen)[:count]]
