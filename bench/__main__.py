"""Run every benchmark in one go: `.venv/bin/python -m bench` (as root; `make bench`)."""

from __future__ import annotations

from bench import capture, reader


def main() -> None:
    capture.main()
    print()
    reader.bench_decode()
    reader.bench_ring()


if __name__ == "__main__":
    main()
