"""A proxy frontend on tokenbroker. Usage: serve_example.py BROKER UPSTREAM PORT; then POST to PORT/PATH?model=M."""
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.error import HTTPError
from urllib.parse import parse_qs, urlsplit
from urllib.request import Request, urlopen

import grpc
from tokenbroker.client import Client

broker = Client(sys.argv[1], token=os.environ.get("TOKENBROKER_TOKEN"))


class Proxy(BaseHTTPRequestHandler):
    def do_POST(self):
        url, body = urlsplit(self.path), self.rfile.read(int(self.headers["Content-Length"]))
        try:
            answer = broker.do(parse_qs(url.query)["model"][0], self.headers.get("X-Session-Id", ""), lambda token, _:
                               urlopen(Request(sys.argv[2] + url.path, body, {"Authorization": f"Bearer {token}"})))
        except HTTPError as error:  # the upstream's last answer was a 4xx or 5xx
            answer = error
        except grpc.RpcError as error:  # no account, e.g. RESOURCE_EXHAUSTED: every one is cooling
            return self.send_error(503, error.details())
        self.send_response(answer.status)
        self.end_headers()
        self.wfile.write(answer.read())


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[3])), Proxy).serve_forever()
