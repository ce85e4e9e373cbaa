"""`serve`: load config, open the ledger, run uvicorn with graceful shutdown."""

from __future__ import annotations

import gc
import logging
from pathlib import Path

from llm_cost_exporter.config import is_loopback, load_config, parse_listen
from llm_cost_exporter.validation import ConfigError

log = logging.getLogger("llm_cost_exporter")


def serve(config_path: Path, listen: str | None, allow_public_listen: bool) -> int:
    import uvicorn

    from llm_cost_exporter.app import create_app
    from llm_cost_exporter.clock import SystemClock
    from llm_cost_exporter.ledger.factory import open_ledger
    from llm_cost_exporter.logs import setup_logging
    from llm_cost_exporter.price_db import GenAIPricesDB

    config = load_config(config_path)
    setup_logging(config.log_level)
    host, port = config.listen_host, config.listen_port
    if listen:
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            raise ConfigError([f"--listen: {exc}"]) from None
    public_ok = allow_public_listen or config.allow_public_listen
    unprotected = [name for name, off in (
        ("ingest (ingest.tokens_env/tokens_file)", not config.ingest.tokens),
        ("proxy (proxy.tokens_env/tokens_file)", bool(config.upstreams) and
         not config.proxy.tokens)) if off]
    if not is_loopback(host) and unprotected and not public_ok:
        raise ConfigError([
            f"listen: {host} is not a loopback address and auth is off for "
            f"{' and '.join(unprotected)}; set the tokens, or pass --allow-public-listen if "
            "a firewall or network policy protects the port"])
    ledger = open_ledger(config.ledger, serving=True)
    app = create_app(config, ledger, SystemClock(), price_db=GenAIPricesDB())
    # What start-up built (the price database, FastAPI's models, the totals) lives as long as
    # the process: freezing it keeps the collector from walking it again on every full
    # collection, which a burst of ingest triggers often (bench/ingest_throughput.py).
    gc.collect()
    gc.freeze()
    log.info("starting", extra={"listen": f"{host}:{port}", "ledger": config.ledger.describe(),
                                "budgets": len(config.budgets)})
    try:
        tls = config.tls
        uvicorn.run(app, host=host, port=port, log_config=None, access_log=False,
                    timeout_graceful_shutdown=10, server_header=False,
                    # X-Forwarded-* are not trusted: attribution never comes from them.
                    proxy_headers=False,
                    ssl_certfile=str(tls.cert_file) if tls else None,
                    ssl_keyfile=str(tls.key_file) if tls else None)
    finally:
        ledger.close()
    return 0
