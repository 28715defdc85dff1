"""Binaries the discovery tests build on this machine: Go clients, static OpenSSL, fake Rust markers."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

GO_TLS_PROGRAM = """package main

import (
\t"crypto/tls"
\t"fmt"
\t"os"
)

func main() {
\tc, err := tls.Dial("tcp", os.Args[1], &tls.Config{InsecureSkipVerify: true})
\tif err != nil {
\t\tfmt.Println(err)
\t\treturn
\t}
\tc.Write([]byte("hi"))
\tbuf := make([]byte, 16)
\tc.Read(buf)
\tc.Close()
}
"""

GO_PLAIN_PROGRAM = """package main

import "fmt"

func main() { fmt.Println("no tls here") }
"""

C_STATIC_OPENSSL = """#include <openssl/ssl.h>
#include <stdio.h>
int main(int argc, char **argv) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *s = SSL_new(ctx);
    char buf[16]; size_t n;
    if (argc > 5) { SSL_write(s, "x", 1); SSL_read(s, buf, 16); SSL_write_ex(s, "x", 1, &n); SSL_read_ex(s, buf, 16, &n); }
    SSL_free(s);
    printf("ok\\n");
    return 0;
}
"""

C_RUST_MARKERS = """#include <stdio.h>
const char *a = "/rustc/90b35a6239c3d8bdabc530a6a0816f7ff89a0aaf/library/core/src/fmt/mod.rs";
const char *b = "/root/.cargo/registry/src/index.crates.io-6f17d22bba15001f/rustls-0.23.12/src/conn.rs";
int main(void) { puts(a); puts(b); return 0; }
"""


def go_build(d: Path, name: str, program: str, flags: list[str]) -> str:
    if not shutil.which("go"):
        pytest.skip("go toolchain not installed")
    src = d / f"src-{name}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "main.go").write_text(program)
    (src / "go.mod").write_text("module example.com/llmspytest\n\ngo 1.17\n")
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="-mod=mod", GOCACHE=str(d / "gocache"), HOME=str(d))
    out = d / name
    subprocess.run(["go", "build", *flags, "-o", str(out), "."], cwd=src, env=env, check=True)
    return str(out)


def cc_build(d: Path, name: str, source: str, libs: list[str]) -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    if not cc:
        pytest.skip("no C compiler")
    (d / f"{name}.c").write_text(source)
    out = d / name
    subprocess.run([cc, "-O1", "-o", str(out), str(d / f"{name}.c"), *libs], check=True, capture_output=True)
    return str(out)


def static_openssl_libs() -> list[str]:
    if not os.path.exists("/usr/lib/x86_64-linux-gnu/libssl.a"):
        pytest.skip("libssl.a (libssl-dev) not installed")
    return ["-Wl,-Bstatic", "-lssl", "-lcrypto", "-Wl,-Bdynamic", "-ldl", "-lpthread"]


def strip_copy(path: str, out: str) -> str:
    subprocess.run(["strip", "-o", out, path], check=True)
    return out
