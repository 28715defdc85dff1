"""The real agents the agent tests run: pinned in versions.txt, installed by install.sh outside the repo."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
DEFAULT_DIR = "/var/cache/llmspyd-test/agents"
# npm downloads ~1 GB for all pinned agents the first time; later runs find them installed
INSTALL_TIMEOUT_S = 1800


@dataclass(frozen=True)
class Agent:
    name: str  # npm package name
    version: str
    prefix: Path

    @property
    def key(self) -> str:
        return f"{self.name.rsplit('/', 1)[-1]}-{self.version}"

    @property
    def cli(self) -> Path:
        """What a user runs: npm's .bin entry."""
        return self.prefix / "node_modules" / ".bin" / BIN_NAMES[self.name]

    @property
    def exe(self) -> Path:
        """The executable that does the TLS: the native binary (Codex's JS launcher spawns one from a
        platform package), else what the .bin symlink points to (a JS file for node agents)."""
        if self.name == "@openai/codex":
            found = sorted((self.prefix / "node_modules" / "@openai").glob("codex-linux-x64/vendor/*/bin/codex"))
            if found:
                return found[0]
        return self.cli.resolve()


BIN_NAMES = {
    "bun": "bun",
    "@anthropic-ai/claude-code": "claude",
    "@google/gemini-cli": "gemini",
    "@openai/codex": "codex",
}


def agents_dir() -> Path:
    return Path(os.environ.get("LLMSPY_AGENTS_DIR") or DEFAULT_DIR)


def pinned() -> list[Agent]:
    out = []
    for line in (HERE / "versions.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, version = line.rpartition("@")
        prefix = agents_dir() / f"{name.lstrip('@').replace('/', '-')}-{version}"
        out.append(Agent(name, version, prefix))
    return out


def ensure_installed() -> list[Agent]:
    """Install every pinned agent that is missing (idempotent), and return them all."""
    subprocess.run(
        ["bash", str(HERE / "install.sh"), str(agents_dir())],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
        stdout=subprocess.DEVNULL,
    )
    agents = pinned()
    for a in agents:
        if not a.exe.is_file():
            raise FileNotFoundError(f"{a.name}@{a.version}: no executable at {a.exe}")
    return agents
