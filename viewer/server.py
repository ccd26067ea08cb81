"""``routescope serve``: the viewer on a Bokeh/Panel server (loopback unless told otherwise)."""

from __future__ import annotations

import ipaddress
import logging
import secrets
from pathlib import Path
from typing import Any

from .config import ViewerConfig, load_config
from .models import ModelRegistry

log = logging.getLogger("routescope.viewer")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def is_loopback(host: str) -> bool:
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
    users: dict[str, str] = {}
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
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
    auth = read_basic_auth(basic_auth) if basic_auth else None
    if is_loopback(host):
        return auth
    if not allow_remote:
        raise ValueError(f"--host {host}: binding beyond 127.0.0.1 needs --allow-remote and --basic-auth FILE")
    if auth is None:
        raise ValueError(f"--host {host}: --allow-remote needs --basic-auth FILE (user:password lines)")
    log.warning("routescope viewer: serving on %s, reachable from other machines (basic auth on)", host)
    return auth


def serve(cfg: ViewerConfig, *, host: str = "127.0.0.1", port: int = 5006, registry: ModelRegistry | None = None,
          basic_auth: dict[str, str] | None = None, threaded: bool = False, show: bool = False, **kwargs: Any):
    """Start the server; ``threaded=True`` returns the running server thread (tests, notebooks)."""
    import panel as pn

    from .app import create_app

    pn.extension()
    registry = registry or ModelRegistry.for_config(cfg)
    opts: dict[str, Any] = dict(address=host, port=port, show=show, threaded=threaded, title="routescope",
                                websocket_origin=[f"{host}:{port}", f"localhost:{port}", f"127.0.0.1:{port}"])
    if basic_auth:
        opts.update(basic_auth=basic_auth, cookie_secret=secrets.token_hex(32))
    opts.update(kwargs)
    return pn.serve({"/": lambda: create_app(cfg, registry)}, **opts)


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(getattr(args, "config", None))
    if getattr(args, "results", None):
        results = Path(args.results).resolve()
        if not results.is_dir():
            raise ValueError(f"--results: {args.results} is not a directory")
        cfg.results.append(results)
    host = getattr(args, "host", "127.0.0.1") or "127.0.0.1"
    auth = check_bind(host, bool(getattr(args, "allow_remote", False)), getattr(args, "basic_auth", None))
    port = int(getattr(args, "port", 5006))
    log.info("routescope viewer on http://%s:%d/ (models: %s)", host, port, ", ".join(cfg.model_names))
    serve(cfg, host=host, port=port, basic_auth=auth, show=bool(getattr(args, "show", False)))
    return 0
