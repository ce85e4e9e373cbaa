"""Command line: serve, check-config, price, migrate, copy-ledger."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from llm_cost_exporter import cli_ledger
from llm_cost_exporter.ledger.base import LedgerUnavailable
from llm_cost_exporter.validation import ConfigError

log = logging.getLogger("llm_cost_exporter")
# The range `price --at` takes: the price tables' date arithmetic overflows past it.
_FIRST_AT = datetime(1970, 1, 1, tzinfo=UTC)
_LAST_AT = datetime(9998, 12, 31, tzinfo=UTC)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llm-cost-exporter", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the exporter")
    serve.add_argument("--config", type=Path, required=True)
    serve.add_argument("--listen", help="HOST:PORT, overrides the config's listen")
    serve.add_argument("--allow-public-listen", action="store_true",
                       help="allow a non-loopback address even without ingest tokens")
    check = sub.add_parser("check-config", help="validate a config and print what it loaded")
    check.add_argument("--config", type=Path, required=True)
    price = sub.add_parser("price", help="price one call (handy for checking a bill)")
    price.add_argument("--provider", required=True)
    price.add_argument("--model", required=True)
    price.add_argument("--config", type=Path, help="config whose pricing overrides to use")
    price.add_argument("--input", type=int, default=0, help="uncached input tokens")
    price.add_argument("--cache-read", type=int, default=0)
    price.add_argument("--cache-write", type=int, default=0)
    price.add_argument("--cache-write-1h", type=int, default=0,
                       help="the part of --cache-write written for 1 hour")
    price.add_argument("--output", type=int, default=0, help="output tokens incl. reasoning")
    price.add_argument("--reasoning", type=int, default=0)
    price.add_argument("--usage", help="a provider usage JSON object instead of token flags")
    price.add_argument("--at", help="price as of this RFC 3339 time (default now)")
    cli_ledger.add_commands(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from llm_cost_exporter.serve import serve as run_server

            return run_server(args.config, args.listen, args.allow_public_listen)
        if args.command == "check-config":
            return _check_config(args.config)
        if args.command == "migrate":
            return cli_ledger.migrate(args.config)
        if args.command == "copy-ledger":
            return cli_ledger.copy_ledger(args.from_sqlite, args.config)
        return _price(args)
    except ConfigError as exc:
        print("configuration errors:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except LedgerUnavailable as exc:
        print(f"ledger unavailable: {exc}", file=sys.stderr)
        return 1


def _check_config(path: Path) -> int:
    from llm_cost_exporter.config import load_config

    cfg = load_config(path)
    print(f"config {path}: OK")
    print(f"  listen: {cfg.listen_host}:{cfg.listen_port}")
    print(f"  ledger: {cfg.ledger.describe()}")
    print(f"  defaults: department={cfg.default_department} project={cfg.default_project}")
    print(f"  pricing overrides: {cfg.pricing_overrides or 'none'} "
          f"({len(cfg.price_table.models)} models, {len(cfg.price_table.aliases)} aliases)")
    print(f"  ingest auth: {len(cfg.ingest.tokens)} token(s)" if cfg.ingest.tokens
          else "  ingest auth: off")
    print(f"  labels: max {cfg.labels.max_values_per_label} values per label, "
          f"{cfg.labels.max_value_length} chars each")
    print(f"  upstreams (proxy): {len(cfg.upstreams)}"
          f"{'; proxy auth on' if cfg.proxy.tokens else ''}")
    for u in cfg.upstreams:
        print(f"    /{u.name}/ -> {u.base_url} ({u.wire_format}, priced as {u.provider}"
              f"{', own key' if u.api_key else ''})")
    print(f"  budgets: {len(cfg.budgets)}")
    for b in cfg.budgets:
        limits = ", ".join(f"{p} ${v}" for p, v in b.limits().items())
        print(f"    {b.department}/{b.project}: {limits}; warn at {b.warning_ratio}; "
              f"{b.timezone}{'; enforced' if b.enforce else ''}")
    return 0


def _price(args: argparse.Namespace) -> int:
    from llm_cost_exporter.config import Config, load_config
    from llm_cost_exporter.events import TokenCounts
    from llm_cost_exporter.price_db import GenAIPricesDB
    from llm_cost_exporter.pricer import Pricer
    from llm_cost_exporter.usage import UsageError, parse_usage

    cfg = load_config(args.config) if args.config else _default_config(Config)
    try:
        at = datetime.fromisoformat(args.at.replace("Z", "+00:00").replace("z", "+00:00")) \
            if args.at else datetime.now(UTC)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:  # as ingest: a time without an offset is not guessed
        print("error: --at must be an RFC 3339 time with an offset (e.g. 2026-03-14T12:00:00Z)",
              file=sys.stderr)
        return 2
    if not _FIRST_AT <= at <= _LAST_AT:
        print("error: --at must be between 1970 and 9998", file=sys.stderr)
        return 2
    try:
        if args.usage:
            tokens = parse_usage(json.loads(args.usage), args.provider.lower())
        else:
            tokens = TokenCounts(input=args.input, cache_read=args.cache_read,
                                 cache_write=args.cache_write, output=args.output,
                                 reasoning=args.reasoning, cache_write_1h=args.cache_write_1h)
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    price = Pricer(cfg.price_table, GenAIPricesDB()).resolve(args.provider.lower(), args.model,
                                                             at)
    if price is None:
        print(f"no price for {args.provider}/{args.model}: add it to your pricing overrides",
              file=sys.stderr)
        return 1
    if not price.covers(tokens):
        print(f"{price.source} has no output price: output tokens cannot be priced",
              file=sys.stderr)
        return 1
    cost = price.cost(tokens)
    rates = price.rates_for(tokens)
    print(f"model: {args.model} -> {price.source}")
    print(f"rates (USD per 1M tokens): input {rates.input}, cache_read "
          f"{rates.cache_read if rates.cache_read is not None else rates.input}, cache_write "
          f"{rates.cache_write if rates.cache_write is not None else rates.input}, output "
          f"{rates.output}")
    print(f"tokens: input {tokens.input}, cache_read {tokens.cache_read}, cache_write "
          f"{tokens.cache_write} (1h {tokens.cache_write_1h}), output {tokens.output} "
          f"(reasoning {tokens.reasoning})")
    print(f"cost USD: input {cost.input.normalize():f} + cache_read "
          f"{cost.cache_read.normalize():f} + cache_write {cost.cache_write.normalize():f} + "
          f"output {cost.output.normalize():f}")
    print(f"total USD: {cost.total.normalize():f}")
    return 0


def _default_config(config_cls: type) -> object:
    from llm_cost_exporter.config import parse_config

    return parse_config({}, base_dir=Path.cwd(), env={})


if __name__ == "__main__":
    raise SystemExit(main())
