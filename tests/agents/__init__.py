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
    def exe(self) -> Path:
        """The real executable (npm's .bin entries are symlinks into the package)."""
        binname = "bun" if self.name == "bun" else "claude"
        return (self.prefix / "node_modules" / ".bin" / binname).resolve()


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
