"""Config is validated once, into typed objects, with every problem reported at once."""

from __future__ import annotations

from decimal import Decimal as D
from pathlib import Path

import pytest

from llm_cost_exporter.cli import main
from llm_cost_exporter.config import load_config, parse_config
from llm_cost_exporter.validation import ConfigError

from conftest import ROOT

TOKEN = "s3cr3t-token-0123456789"


def test_example_config_loads() -> None:
    cfg = load_config(ROOT / "examples" / "config.yaml")
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 9464)
    assert cfg.ledger.path == ROOT / "examples" / "data" / "ledger.db"
    assert cfg.pricing_overrides == ROOT / "examples" / "pricing.yaml"
    ds = next(b for b in cfg.budgets if b.department == "data-science")
    assert (ds.project, ds.daily_usd, ds.monthly_usd, ds.warning_ratio, ds.timezone) == (
        "*", D(100), D(2000), D("0.8"), "Asia/Ho_Chi_Minh")
    assert "engineering" in cfg.known_departments and "ai-features" in cfg.known_projects


def test_every_problem_is_reported_with_its_path(tmp_path: Path) -> None:
    data = {
        "listen": "nowhere",
        "ledger": {"backend": "mysql"},
        "labels": {"max_values_per_label": 0},
        "ingest": {"tokens": ["inline"], "max_future_seconds": 10**12},
        "budgets": [
            {"department": "a", "monthly_usd": 10},
            {"department": "b", "daily_usd": "x", "timezone": "Mars/Olympus"},
            {"department": "c", "monthly_usd": 0, "warning_ratio": 1.5},
            {"project": "p"},
            {"department": "a", "monthly_usd": 5, "colour": "red"},
        ],
        "typo_key": 1,
    }
    with pytest.raises(ConfigError) as err:
        parse_config(data, tmp_path, env={})
    assert set(err.value.problems) == {
        "listen: must be HOST:PORT with a port in 1-65535",
        "ledger.backend: must be 'sqlite' or 'postgres'",
        "labels.max_values_per_label: must be >= 1 and <= 100000",
        "ingest.tokens: inline tokens are not allowed: use tokens_env or tokens_file",
        # 10**12 s would overflow `now + max_future_seconds` on every request.
        "ingest.max_future_seconds: must be >= 0 and <= 31622400",
        "budgets[1].daily_usd: must be a number",
        "budgets[1].timezone: unknown IANA time zone 'Mars/Olympus'",
        "budgets[2].monthly_usd: must be > 0",
        "budgets[2].warning_ratio: must be > 0 and <= 1",
        "budgets[3].department: is required",
        "budgets[3]: needs daily_usd, monthly_usd or both",
        "budgets[4].colour: unknown key (allowed: daily_usd, department, enforce, "
        "monthly_usd, project, timezone, warning_ratio)",
        "budgets[4]: duplicate budget for department=a project=*",
        "typo_key: unknown key (allowed: allow_public_listen, budgets, defaults, ingest, "
        "labels, ledger, listen, log, metrics, pricing, proxy, tls, upstreams)",
    }


def test_tokens_from_env_and_file_never_inline(tmp_path: Path) -> None:
    (tmp_path / "tokens").write_text(f"# ingest tokens\n{TOKEN}-file\n\n")
    cfg = parse_config({"ingest": {"tokens_env": "TOK", "tokens_file": "tokens"}}, tmp_path,
                       env={"TOK": f"{TOKEN}-a, {TOKEN}-b"})
    assert cfg.ingest.tokens == (f"{TOKEN}-a", f"{TOKEN}-b", f"{TOKEN}-file")
    with pytest.raises(ConfigError) as err:
        parse_config({"ingest": {"tokens_env": "MISSING"}}, tmp_path, env={"X": "short"})
    assert "ingest.tokens_env: environment variable MISSING is not set" in err.value.problems
    with pytest.raises(ConfigError) as err:
        parse_config({"ingest": {"tokens_env": "T"}}, tmp_path, env={"T": "short"})
    # The error names the token by position, never by value.
    assert err.value.problems == ["ingest.tokens: token #1 is shorter than 16 characters"]


def test_check_config_prints_what_it_loaded(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", "--config", str(ROOT / "examples" / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "data-science/*: daily $100, monthly $2000; warn at 0.8; Asia/Ho_Chi_Minh" in out
    assert "ingest auth: off" in out
    assert "upstreams (proxy): 0" in out


def test_check_config_lists_every_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("budgets:\n  - {department: a, monthly_usd: -1}\n  - {department: b}\n")
    assert main(["check-config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "budgets[0].monthly_usd: must be > 0" in err
    assert "budgets[1]: needs daily_usd, monthly_usd or both" in err


def test_price_command_shows_the_arithmetic(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["price", "--provider", "anthropic", "--model", "claude-sonnet-4-5-20250929",
                 "--input", "40", "--cache-write", "3000", "--cache-read", "12000",
                 "--output", "700"])
    assert code == 0
    # 40×3 + 3000×3.75 + 12000×0.30 + 700×15 per 1M = 0.02547
    assert "total USD: 0.02547" in capsys.readouterr().out
    assert main(["price", "--provider", "openai", "--model", "no-such-model"]) == 1


def test_price_command_needs_an_offset_in_at(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["price", "--provider", "openai", "--model", "gpt-4o-mini", "--input", "1000000"]
    assert main([*args, "--at", "2026-03-14T12:00:00"]) == 2  # no offset: not guessed
    assert "--at must be an RFC 3339 time with an offset" in capsys.readouterr().err
    assert main([*args, "--at", "yesterday"]) == 2
    assert main([*args, "--at", "2026-03-14T12:00:00Z"]) == 0
    assert main([*args, "--at", "2026-03-14T12:00:00z"]) == 0  # as ingest reads it
    assert main([*args, "--at", "9998-12-30T23:50:00Z"]) == 0
    # 1,000,000 input tokens × 0.15 per 1M = 0.15, three times
    assert capsys.readouterr().out.count("total USD: 0.15\n") == 3
    # Where the price tables' date arithmetic would overflow: refused, not a traceback.
    for at in ("9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "1969-12-31T23:59Z"):
        assert main([*args, "--at", at]) == 2
        assert "--at must be between 1970 and 9998" in capsys.readouterr().err
