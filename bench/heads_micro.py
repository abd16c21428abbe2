"""
The header work of one request on both hops, in one process: CPU microseconds per request for
varied heads (a browser's 11-field request; a 17-field nginx response with its own Set-Cookie and
request id) and for the static workload's (a Host-only request, the same 9-field response).

The edge's request-head reader, its forwarded headers, the codec's Open both ways, the agent's
request writer and response parser, its end-to-end filter, the codec's Reply both ways and the
edge's reply block: no sockets, no reactor, so an A/B of the header path needs no quiet machine
(run the other tree's copy with PYTHONPATH at it, alternated).

Usage: python bench/heads_micro.py [REQUESTS] [ROUNDS]
"""
import random
import sys
import time

from tunneld.agent import upstream as up
from tunneld.agent.http1_wire import HeadMemo, RequestWriter, ResponseParser
from tunneld.edge.forwarding import HOP_BY_HOP, forwarded_headers
from tunneld.edge.http1.fast import fast_block
from tunneld.edge.http1.fasthead import FastMemo, read_head, response_head_with
from tunneld.model.messages import ReplyHead, StreamHead
from tunneld.wire.codec import Codec

rng = random.Random(5)
UAS = [b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36",
       b"curl/8.5.0", b"okhttp/4.12.0", b"python-requests/2.31"]
def request(varied, i):
    if not varied:
        return b"GET /small HTTP/1.1\r\nHost: app.bench.test:8080\r\n\r\n"
    h = rng.getrandbits(64)
    return (b"GET /assets/app.%x.js?v=%d HTTP/1.1\r\nHost: app.bench.test:8080\r\nUser-Agent: %s\r\n"
            b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
            b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
            b"Cookie: sid=%016x; _ga=GA1.2.%d.%d\r\ntraceparent: 00-%032x-%016x-01\r\n"
            b"Sec-Fetch-Mode: no-cors\r\nReferer: https://app.bench.test/\r\n\r\n") % (
            i % 40, i % 7, UAS[i % 4], h, h % 99999, i, rng.getrandbits(128), h)
def response(varied, i):
    if not varied:
        return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 19:00:00 GMT\r\n"
                b"Content-Type: application/octet-stream\r\nContent-Length: 64\r\n"
                b"Last-Modified: Wed, 25 Nov 2026 18:00:00 GMT\r\nConnection: keep-alive\r\n"
                b'ETag: "6565e0a0-40"\r\nAccept-Ranges: bytes\r\n\r\n' + b"x" * 64)
    rid = b"%032x" % rng.getrandbits(128)
    return (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 19:00:00 GMT\r\n"
            b"Content-Type: application/javascript\r\nContent-Length: 100\r\n"
            b"Last-Modified: Wed, 25 Nov 2026 18:00:00 GMT\r\nConnection: keep-alive\r\n"
            b'ETag: "6565e0a0-%x"\r\nSet-Cookie: sid=%s; Path=/; HttpOnly; SameSite=Lax\r\nX-Request-Id: %s\r\n'
            b"Cache-Control: public, max-age=31536000, immutable\r\nVary: Accept-Encoding\r\n"
            b"Strict-Transport-Security: max-age=63072000\r\nX-Content-Type-Options: nosniff\r\n"
            b"Referrer-Policy: strict-origin-when-cross-origin\r\nAccept-Ranges: bytes\r\n\r\n" % (i % 40, rid, rid)
            + b"x" * 100)

class Sink:
    def response_head(self, status, reason, headers): self.head = (status, reason, headers)
    def response_data(self, d): pass
    def response_end(self, d, t, r): pass

def run(varied, n):
    reqs = [request(varied, i) for i in range(n)]
    resps = [response(varied, i) for i in range(n)]
    ecodec, acodec = Codec(), Codec()
    fmemo = FastMemo()
    hm = HeadMemo()
    parser = ResponseParser()
    writer = RequestWriter(hm)
    sink = Sink()
    t0 = time.process_time()
    out = 0
    for i in range(n):
        method, target, fields, end = read_head(reqs[i])
        fwd = forwarded_headers(fields, HOP_BY_HOP, b"app.bench.test:8080", b"127.0.0.1", "http", b"1.1 tunneld")
        sh = StreamHead("http", "app", method.decode("latin-1"), target.decode("latin-1"), tuple(fwd), "127.0.0.1:4000", "http")
        frame = ecodec.open_bytes(7, sh, True)
        _, _, head, _ = acodec.read(frame)
        wire = writer.head(head.method.encode("latin-1"), head.target.encode("latin-1"), list(head.headers))
        parser.expect(sink, False)
        parser.feed(resps[i])
        st, rs, hdrs = sink.head
        kept = up._end_to_end(hdrs)
        rb = acodec.reply_bytes(7, ReplyHead(st, rs, kept))
        _, _, reply, _ = ecodec.read(rb)
        block, length = fast_block(reply.headers, b"1.1 tunneld", fmemo)
        out += len(response_head_with(reply.status, reply.reason, block)) + len(wire)
    return 1e6 * (time.process_time() - t0) / n, out

n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
for _r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 3):
    v, o1 = run(True, n)
    s, o2 = run(False, n)
    print(f"varied {v:.1f} us/req  static {s:.1f} us/req  ({o1//n}, {o2//n} bytes)")
