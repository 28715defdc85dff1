"""`llmspyd`: argv → settings → app.run()."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from llmspyd import logging as llog
from llmspyd.settings import DEFAULT_CONFIG_DIR, ConfigError, load


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llmspyd",
        description="Record, in clear text, what every LLM agent on this machine sends to its model provider "
        "and what comes back (eBPF uprobes on TLS libraries).",
    )
    p.add_argument(
        "--config-dir",
        default=str(DEFAULT_CONFIG_DIR),
        metavar="DIR",
        help="read DIR/llmspyd.toml and DIR/llmspyd.d/*.toml (default: %(default)s)",
    )
    p.add_argument("--no-config", action="store_true", help="built-in defaults only, read no file")
    p.add_argument(
        "--output",
        action="append",
        metavar="SPEC",
        help="journald | stdout | jsonl:PATH | auto; repeatable; replaces [output] sinks",
    )
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    p.add_argument("--print-config", action="store_true", help="print the merged configuration as JSON and exit")
    p.add_argument("--dump-chunks", metavar="PATH", help="also append every captured chunk to PATH as JSON lines")
    return p


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if args.output:
        o["output"] = {"sinks": args.output}
    if args.log_level:
        o["daemon"] = {"log_level": args.log_level}
    return o


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config_dir = None if args.no_config else args.config_dir
    overrides = overrides_from(args)
    try:
        settings = load(config_dir, overrides)
    except ConfigError as e:
        print(f"llmspyd: configuration error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print("configuration OK: " + ", ".join(settings.sources))
        return 0
    if args.print_config:
        print(settings.model_dump_json(indent=2))
        return 0
    llog.setup(settings.daemon.log_level)
    from llmspyd import app

    return app.run(settings, config_dir=config_dir, overrides=overrides, dump_chunks=args.dump_chunks)


if __name__ == "__main__":
    sys.exit(main())
