"""A small loopback egress proxy for the end-to-end tests: HTTP CONNECT and SOCKS5 (RFC 1928, with
RFC 1929 user/password), on 127.0.0.1 port 0. Each proxy opens its connections to the target from
its own loopback source address (127.0.0.2, 127.0.0.3, ...): the fake upstream records the address
every request came from, so a test sees which egress each account's calls left through. Standard
library only (/usr/bin/python3)."""
import base64
import ipaddress
import select
import socket
import socketserver
import struct
import threading


class EgressProxy:
    """A CONNECT + SOCKS5 proxy. With user/password set, a client without them is refused (407 /
    SOCKS auth failure). `tunnels` lists (protocol, target, authorised) per connection."""

    def __init__(self, source_ip, user="", password="", port=0):
        self.source_ip = source_ip
        self.user = user
        self.password = password
        self.tunnels = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, scheme="http"):
        creds = f"{self.user}:{self.password}@" if self.user else ""
        return f"{scheme}://{creds}127.0.0.1:{self.port}"

    def stop(self):
        self._server.shutdown()
        self._server.server_close()

    def count(self):
        with self._lock:
            return len(self.tunnels)

    def _record(self, protocol, target, authorised):
        with self._lock:
            self.tunnels.append((protocol, target, authorised))

    def _connect(self, host, port):
        return socket.create_connection((host, port), timeout=10, source_address=(self.source_ip, 0))

    def _serve(self, client):
        client.settimeout(10)
        first = client.recv(1, socket.MSG_PEEK)
        if not first:
            return
        if first[0] == 5:
            self._serve_socks5(client)
        else:
            self._serve_connect(client)

    def _serve_connect(self, client):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = client.recv(4096)
            if not chunk or len(data) > 65536:
                return
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target = (lines[0].split(" ") + ["", ""])[:2]
        auth = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "proxy-authorization":
                auth = value.strip()
        want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        authorised = not self.user or auth == want
        self._record("connect", target, authorised)
        if method != "CONNECT":
            client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
            return
        if not authorised:
            client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                           b"Proxy-Authenticate: Basic realm=\"egress\"\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = target.rpartition(":")
        try:
            upstream = self._connect(host.strip("[]"), int(port))
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        if rest:
            upstream.sendall(rest)
        self._relay(client, upstream)

    def _recv_exact(self, sock, n):
        out = b""
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("closed")
            out += chunk
        return out

    def _serve_socks5(self, client):
        try:
            _, nmethods = self._recv_exact(client, 2)
            methods = self._recv_exact(client, nmethods)
            wanted = 2 if self.user else 0
            if wanted not in methods:
                client.sendall(b"\x05\xff")
                self._record("socks5", "", False)
                return
            client.sendall(bytes([5, wanted]))
            authorised = True
            if wanted == 2:
                _, ulen = self._recv_exact(client, 2)
                user = self._recv_exact(client, ulen).decode("latin-1")
                (plen,) = self._recv_exact(client, 1)
                password = self._recv_exact(client, plen).decode("latin-1")
                authorised = user == self.user and password == self.password
                client.sendall(b"\x01\x00" if authorised else b"\x01\x01")
            _, cmd, _, atyp = self._recv_exact(client, 4)
            if atyp == 1:
                host = str(ipaddress.IPv4Address(self._recv_exact(client, 4)))
            elif atyp == 3:
                (n,) = self._recv_exact(client, 1)
                host = self._recv_exact(client, n).decode("latin-1")
            elif atyp == 4:
                host = str(ipaddress.IPv6Address(self._recv_exact(client, 16)))
            else:
                return
            (port,) = struct.unpack("!H", self._recv_exact(client, 2))
            self._record("socks5", f"{host}:{port}", authorised)
            if not authorised:
                return
            if cmd != 1:
                client.sendall(b"\x05\x07\x00\x01" + b"\x00" * 6)
                return
            try:
                upstream = self._connect(host, port)
            except OSError:
                client.sendall(b"\x05\x05\x00\x01" + b"\x00" * 6)
                return
            client.sendall(b"\x05\x00\x00\x01" + socket.inet_aton("127.0.0.1") + b"\x00\x00")
            self._relay(client, upstream)
        except (ConnectionError, OSError, ValueError):
            return

    @staticmethod
    def _relay(a, b):
        try:
            socks = [a, b]
            while True:
                readable, _, _ = select.select(socks, [], [], 10)
                if not readable:
                    return
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            b.close()


def dead_port():
    """A loopback port nothing listens on: connecting to it is refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
