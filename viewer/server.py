"""``routescope serve``: the viewer on a Bokeh/Panel server (loopback unless told otherwise).

Limits applied by the server, before any work (see ``ViewerConfig``):

* websocket messages from a browser over ``max_message_bytes`` (default 2 MiB) close that
  connection before they are read (Tornado's ``websocket_max_message_size``);
* prompts over ``max_prompt_chars`` characters are refused before they are tokenised;
* with ``--basic-auth``, passwords are compared in constant time over every configured user, and
  failed logins are throttled per client address (``LoginThrottle``: after 3 free failures, the
  client must wait 1 s, 2 s, 4 s, ... up to 5 minutes; attempts meanwhile get HTTP 429 without a
  password check) and logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from .config import ViewerConfig, load_config
from .models import ModelRegistry

log = logging.getLogger("routescope.viewer")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def normalize_host(host: str) -> str:
    """``--host`` without IPv6 brackets (``[::1]`` -> ``::1``); refuses empty and malformed values."""
    host = str(host).strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host or "[" in host or "]" in host:
        raise ValueError(f"--host {host!r}: not a host name or IP address")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"--host {host!r}: not a host name or IP address (IPv6 addresses look like ::1)") from None
    return host


def url_host(host: str) -> str:
    """``host`` as written in a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def parse_port(value: Any) -> int:
    """``--port``: an integer in 1-65535."""
    text = str(value).strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,12}", text):
        raise ValueError(f"--port {text!r}: not a port number (an integer in 1-65535)")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port}: out of range (1-65535)")
    return port


def is_loopback(host: str) -> bool:
    try:
        host = normalize_host(host)
    except ValueError:
        return False
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_basic_auth(path: str | Path) -> dict[str, str]:
    """``user:password`` lines (blank lines and ``#`` comments ignored) -> dict."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--basic-auth: {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ValueError(f"--basic-auth: {path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--basic-auth: {path}: not valid UTF-8 (byte {exc.start})") from None
    users: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"--basic-auth: {path}:{i}: expected user:password")
        users[user] = password
    if not users:
        raise ValueError(f"--basic-auth: {path} holds no user:password line")
    return users


def check_bind(host: str, allow_remote: bool, basic_auth: str | None) -> dict[str, str] | None:
    """Refuse to bind beyond loopback without ``--allow-remote`` and ``--basic-auth``."""
    host = normalize_host(host)
    auth = read_basic_auth(basic_auth) if basic_auth else None
    if is_loopback(host):
        return auth
    if not allow_remote:
        raise ValueError(f"--host {host}: binding beyond 127.0.0.1 needs --allow-remote and --basic-auth FILE")
    if auth is None:
        raise ValueError(f"--host {host}: --allow-remote needs --basic-auth FILE (user:password lines)")
    log.warning("routescope viewer: serving on %s, reachable from other machines (basic auth on)", host)
    return auth


# ------------------------------------------------------------------------------------ basic auth
def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def check_password(users: dict[str, str], username: str, password: str) -> bool:
    """Whether ``username:password`` is one of ``users``, in time independent of which user or
    password matched: every configured user is compared (no early exit), on SHA-256 digests
    (equal lengths) with ``hmac.compare_digest``."""
    u, p = _digest(username), _digest(password)
    ok = 0
    for user, pw in users.items():
        ok |= hmac.compare_digest(u, _digest(user)) & hmac.compare_digest(p, _digest(pw))
    return bool(ok)


class LoginThrottle:
    """Failed logins per client (an IPv4 address, or the /64 network of an IPv6 one).

    The first ``free`` failures cost nothing (typos); after failure ``free + k`` (k >= 1) the
    client is locked out for ``min(base_s * 2**(k - 1), max_s)`` seconds, during which login attempts are refused
    (HTTP 429) without checking the password. A success forgets the client. At most
    ``max_clients`` clients are remembered (least recently failed forgotten first), and a client
    without failures for ``forget_s`` seconds is forgotten.
    """

    def __init__(self, free: int = 3, base_s: float = 1.0, max_s: float = 300.0, forget_s: float = 900.0,
                 max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic):
        self.free, self.base_s, self.max_s, self.forget_s = int(free), float(base_s), float(max_s), float(forget_s)
        self.max_clients = int(max_clients)
        self.clock = clock
        self._clients: OrderedDict[str, tuple[int, float, float]] = OrderedDict()  # failures, locked until, last
        self._lock = threading.Lock()
        self.refused = 0  # attempts refused while locked out (tests, logs)
        self.failed = 0  # failed password checks

    @staticmethod
    def client_key(address: str) -> str:
        try:
            ip = ipaddress.ip_address(str(address))
        except ValueError:
            return str(address)[:64]
        if ip.version == 6:
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def _entry(self, key: str, now: float) -> tuple[int, float, float] | None:
        e = self._clients.get(key)
        if e is not None and now - e[2] > self.forget_s and now >= e[1]:
            del self._clients[key]
            return None
        return e

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now); counts a refusal when > 0."""
        key, now = self.client_key(address), self.clock()
        with self._lock:
            e = self._entry(key, now)
            wait = 0.0 if e is None else max(0.0, e[1] - now)
            if wait > 0:
                self.refused += 1
            return wait

    def failure(self, address: str) -> float:
        """Record a failed login; returns the lockout it starts (0 while failures are free)."""
        key, now = self.client_key(address), self.clock()
        with self._lock:
            self.failed += 1
            e = self._entry(key, now)
            n = (e[0] if e else 0) + 1
            lock = 0.0 if n <= self.free else min(self.base_s * 2 ** min(n - self.free - 1, 32), self.max_s)
            self._clients[key] = (n, now + lock, now)
            self._clients.move_to_end(key)
            while len(self._clients) > self.max_clients:
                self._clients.popitem(last=False)
            return lock

    def success(self, address: str) -> None:
        with self._lock:
            self._clients.pop(self.client_key(address), None)

    def failures(self, address: str) -> int:
        with self._lock:
            e = self._entry(self.client_key(address), self.clock())
            return 0 if e is None else e[0]

    def __len__(self) -> int:
        return len(self._clients)


def auth_provider(users: dict[str, str], throttle: LoginThrottle | None = None):
    """A Panel ``BasicAuthProvider`` whose login form checks ``users`` with ``check_password``
    and throttles failures with ``throttle``."""
    import tornado.escape
    from panel.auth import BasicAuthProvider, BasicLoginHandler, _validate_next_url
    from panel.io.state import state

    users = dict(users)
    throttle = LoginThrottle() if throttle is None else throttle

    class LoginHandler(BasicLoginHandler):
        def _validate(self, username, password):
            return check_password(users, username, password)

        def post(self):
            client = self.request.remote_ip or "?"
            wait = throttle.retry_after(client)
            if wait > 0:
                log.warning("viewer: login refused for %s: locked out for %.0f s more after failed logins",
                            client, wait)
                self.set_status(429)
                self.set_header("Retry-After", str(math.ceil(wait)))
                self.set_header("Content-Type", "text/plain; charset=utf-8")
                self.finish(f"Too many failed logins: try again in {math.ceil(wait)} s.\n")
                return
            username = self.get_argument("username", "")
            password = self.get_argument("password", "")
            if self._validate(username, password):
                throttle.success(client)
                self.set_current_user(username)
                self.redirect(_validate_next_url(self.get_cookie("next_url", state.base_url)))
                return
            lock = throttle.failure(client)
            log.warning("viewer: failed login for user %r from %s (%d failures%s)", username[:64], client,
                        throttle.failures(client), f"; locked out for {lock:.0f} s" if lock else "")
            self.redirect(self.request.path + "?error=" + tornado.escape.url_escape("Invalid username or password!"))

    class Provider(BasicAuthProvider):
        @property
        def login_handler(self):
            LoginHandler._login_endpoint = self._login_endpoint
            LoginHandler._login_template = self._login_template
            return LoginHandler

    provider = Provider()
    provider.throttle = throttle
    return provider


# ------------------------------------------------------------------------------------ serving
def _support_ipv6_hosts() -> None:
    """Let Bokeh and Panel serve a page at ``http://[ADDR]:PORT/`` (an IPv6 host such as ::1).

    Two library functions split host strings on ':' and fail on bracketed IPv6 literals:
    Bokeh's ``create_hosts_allowlist`` (the websocket-origin allowlist; its matcher,
    ``match_host``, compares ``[::1]:5006`` correctly) and Panel's ``_get_location_params`` (the
    page's ``Host`` header, a 500 error for every page). Both are wrapped: entries/hosts
    ``[ADDR]`` or ``[ADDR]:PORT`` with a valid IPv6 ADDR are handled here, everything else by the
    original. Installed once, idempotent."""
    import bokeh.server.server as bokeh_server
    import panel.io.location as panel_location

    bracketed = re.compile(r"\[([0-9A-Fa-f:.]+)\](?::([0-9]{1,5}))?")

    original = bokeh_server.create_hosts_allowlist
    if not getattr(original, "_routescope_ipv6", False):
        def create_hosts_allowlist(host_list, port):
            ipv6, rest = [], []
            for h in host_list or []:
                m = bracketed.fullmatch(h)
                if m and m.group(2):
                    ipaddress.IPv6Address(m.group(1))
                    ipv6.append(h.lower())
                else:
                    rest.append(h)
            return (original(rest, port) if rest or not ipv6 else []) + ipv6

        create_hosts_allowlist._routescope_ipv6 = True
        bokeh_server.create_hosts_allowlist = create_hosts_allowlist

    location_params = panel_location._get_location_params
    if not getattr(location_params, "_routescope_ipv6", False):
        def get_location_params(protocol, host, uri):
            m = bracketed.fullmatch(host or "")
            if not m:
                return location_params(protocol, host, uri)
            params = location_params(protocol, None, uri)
            prefix = f"{protocol}:" if protocol else ""
            params["href"] = prefix + f"//{host}" + params.get("href", "")[len(prefix):]
            params["hostname"] = f"[{m.group(1)}]"
            if m.group(2):
                params["port"] = m.group(2)
            return params

        get_location_params._routescope_ipv6 = True
        panel_location._get_location_params = get_location_params


def serve(cfg: ViewerConfig, *, host: str = "127.0.0.1", port: int = 5006, registry: ModelRegistry | None = None,
          basic_auth: dict[str, str] | None = None, threaded: bool = False, show: bool = False,
          throttle: LoginThrottle | None = None, **kwargs: Any):
    """Start the server; ``threaded=True`` returns the running server thread (tests, notebooks)."""
    import panel as pn

    from .app import create_app

    host = normalize_host(host)
    pn.extension()
    registry = registry or ModelRegistry.for_config(cfg)
    origins = [f"{url_host(host)}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"]
    if ":" in host:  # an IPv6 address: the page's origin is http://[ADDR]:PORT
        _support_ipv6_hosts()
    opts: dict[str, Any] = dict(address=host, port=port, show=show, threaded=threaded, title="routescope",
                                websocket_origin=sorted(set(origins)),
                                websocket_max_message_size=int(cfg.max_message_bytes))
    if basic_auth:
        opts.update(auth_provider=auth_provider(basic_auth, throttle), cookie_secret=secrets.token_hex(32))
    opts.update(kwargs)
    return pn.serve({"/": lambda: create_app(cfg, registry)}, **opts)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    port = parse_port(getattr(args, "port", 5006))
    host = normalize_host(getattr(args, "host", "127.0.0.1") or "127.0.0.1")
    cfg = load_config(getattr(args, "config", None))
    if getattr(args, "results", None):
        results = Path(args.results).resolve()
        if not results.is_dir():
            raise ValueError(f"--results: {args.results} is not a directory")
        cfg.results.append(results)
    auth = check_bind(host, bool(getattr(args, "allow_remote", False)), getattr(args, "basic_auth", None))
    log.info("routescope viewer on http://%s:%d/ (models: %s)", url_host(host), port, ", ".join(cfg.model_names))
    try:
        serve(cfg, host=host, port=port, basic_auth=auth, show=bool(getattr(args, "show", False)))
    except OSError as exc:  # in use, not ours to bind, unknown host: one line, no traceback
        why = exc.strerror or str(exc)
        raise ValueError(f"--host {host} --port {port}: cannot listen: {why}") from None
    return 0
