"""
A Python-only upstream for the smoke mode: the bench www directory over twisted.web.

The static workload's files (/small, /1m, /big) are a plain static.File; the
varied site is served as bench/runner.py's nginx upstream serves it: the
response header sets of bench/workload.py with a new cookie and request id
each time, /pages/ chunked with the id in the body, POSTs to /api/ and
/upload/ read and answered with a short JSON body.  Slow next to nginx: it
exercises the harness, it measures nothing worth publishing.

Usage: python bench/pyupstream.py WWW_DIR; prints "listening PORT" once bound.
"""

import os
import sys
import uuid

from twisted.internet import reactor
from twisted.web import resource, server, static

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import workload  # noqa: E402


class VariedSite(resource.Resource):
    """The varied site, from memory; each response gets its own cookie and request id."""

    isLeaf = True

    def __init__(self, www: str) -> None:
        super().__init__()
        self.files: dict[bytes, tuple[bytes, bytes, bool]] = {}
        for f in workload.site_files():
            with open(os.path.join(www, f.path.lstrip("/")), "rb") as data:
                self.files[f.path.encode()] = (f.content_type.encode(), data.read(), f.chunked)

    def headers(self, request: server.Request, kind: str) -> str:
        request_id = uuid.uuid4().hex
        for name, value in workload.RESPONSE_HEADERS[kind]:
            request.setHeader(name, value.replace("$request_id", request_id))
        return request_id

    def render_GET(self, request: server.Request) -> bytes:  # noqa: N802
        found = self.files.get(request.path)
        if found is None:
            request.setResponseCode(404)
            return b"not found\n"
        ctype, data, chunked = found
        kind = "page" if chunked else "api" if request.path.startswith(b"/api/") else "asset"
        request_id = self.headers(request, kind)
        request.setHeader("Content-Type", ctype)
        if not chunked:
            return data
        # No Content-Length: twisted.web sends it chunked, as nginx's SSI does.
        head, _, tail = data.partition(workload.SSI_REQUEST_ID.encode())
        request.write(head)
        request.write(request_id.encode() + tail)
        request.finish()
        return server.NOT_DONE_YET  # type: ignore[no-any-return]

    def render_POST(self, request: server.Request) -> bytes:  # noqa: N802
        # twisted.web has read the whole body before it renders, as nginx does here.
        request.content.read()
        for prefix, status, answer in ((b"/upload/", 201, "stored.json"), (b"/api/", 200, "ok.json")):
            if request.path.startswith(prefix):
                self.headers(request, "api")
                request.setResponseCode(status)
                request.setHeader("Content-Type", "application/json")
                return workload.ANSWERS[answer]
        request.setResponseCode(405)
        return b"method not allowed\n"


class Root(resource.Resource):
    """The static workload's files as static.File, everything else the varied site."""

    def __init__(self, www: str) -> None:
        super().__init__()
        self.varied = VariedSite(www)
        for name in ("small", "1m", "big"):
            child = static.File(os.path.join(www, name), defaultType="application/octet-stream")
            self.putChild(name.encode(), child)

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:  # noqa: N802
        return self.varied


def main() -> None:
    site = server.Site(Root(sys.argv[1]))
    site.displayTracebacks = False
    port = reactor.listenTCP(0, site, backlog=1024, interface="127.0.0.1")
    print(f"listening {port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
