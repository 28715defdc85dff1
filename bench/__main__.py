"""Run every benchmark in one go: `.venv/bin/python -m bench` (as root; `make bench`). Prints figures only.

`python -m bench NAME ...` runs only the named ones."""

from __future__ import annotations

import sys
from collections.abc import Callable


def _capture() -> None:
    from bench import capture

    capture.main()


def _reader() -> None:
    from bench import reader

    reader.bench_decode()
    reader.bench_ring()


def _stacks() -> None:
    from bench import capture_stacks

    capture_stacks.main()


def _discovery() -> None:
    from bench import discovery

    discovery.main()


def _boringssl() -> None:
    from bench import boringssl_scan

    boringssl_scan.main([])


def _http() -> None:
    from bench import pipeline_http

    pipeline_http.main()


def _llm() -> None:
    from bench import pipeline_llm

    pipeline_llm.main()


def _sinks() -> None:
    from bench import sinks

    sinks.main()


BENCHES: dict[str, Callable[[], None]] = {
    "capture": _capture,  # probe cost per SSL_write vs the empty-probe floor, zero-loss throughput, RssAnon
    "reader": _reader,  # ring-buffer decode and reader CPU per record
    "stacks": _stacks,  # GnuTLS and Go probe cost vs the floor
    "discovery": _discovery,  # scan cost per file, exec -> probes attached
    "boringssl": _boringssl,  # stripped BoringSSL finder on the installed agents
    "http": _http,  # streams + HTTP/1.1 and HTTP/2 parsing
    "llm": _llm,  # the whole pipeline on a realistic agent mix
    "sinks": _sinks,  # redaction and journald throughput
}


def main(names: list[str]) -> None:
    for name in names or list(BENCHES):
        print(f"=== {name}", flush=True)
        try:
            BENCHES[name]()
        except Exception as e:  # noqa: BLE001 - one bench that cannot run here must not hide the others
            print(f"{name}: could not run: {e!r}")
        print(flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
