"""Running the supervisor at boot: a systemd unit for this project (`supervisor install-service`).

The unit runs `supervisor start` in the foreground (its console goes to the journal;
every process keeps its own log files in the state dir as always). Stopping is the
supervisor's own clean stop: systemd sends SIGTERM to the supervisor only
(`KillMode=mixed`), which deregisters and drains every instance and stops the
infrastructure; whatever is still there when `TimeoutStopSec` runs out is SIGKILLed by
systemd, as by the supervisor's own stop. `systemctl reload` sends SIGHUP (reread the
config and apply it). The unit holds no secret: the config file and the state dir do.
"""

from __future__ import annotations

import os
import pwd
import sys
from pathlib import Path

from supervisor.config import Config

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")


def unit_name(config: Config) -> str:
    """meshvisor.service, or meshvisor-<folder>.service for a project not named so."""
    folder = "".join(c if c.isalnum() or c in "-_" else "-" for c in config.root.name)
    return "meshvisor.service" if folder in ("", "meshvisor") else f"meshvisor-{folder}.service"


def render(config: Config, user: str | None = None) -> str:
    """The unit's text. `user`: run as that user (default: whoever installs it)."""
    supervisor = Path(sys.executable).parent / "supervisor"
    command = f"{supervisor} --config {config.config_path} start" if supervisor.exists() else \
        f"{sys.executable} -m supervisor --config {config.config_path} start"
    stop_seconds = 30 + max((s.stop_timeout + s.drain_seconds for s in config.services.values()), default=10)
    run_as = user or pwd.getpwuid(os.getuid()).pw_name
    lines = [
        "[Unit]",
        f"Description=meshvisor stack of {config.root}",
        "Documentation=file://" + str(config.root / "README.md"),
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"ExecStart={command}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        f"WorkingDirectory={config.root}",
        "Environment=NO_COLOR=1 PYTHONUNBUFFERED=1",
        # SIGTERM to the supervisor alone: it stops its processes in order (drain first).
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={int(stop_seconds)}",
        "Restart=on-failure",
        "RestartSec=2",
        # Every supervised process inherits it (the supervisor raises soft to hard, too).
        "LimitNOFILE=65536",
    ]
    if run_as != "root":
        lines.append(f"User={run_as}")
    lines += ["", "[Install]", "WantedBy=multi-user.target", ""]
    return "\n".join(lines)


def install(config: Config, unit_dir: Path = DEFAULT_UNIT_DIR, user: str | None = None) -> Path:
    """Write the unit (mode 0644: it holds no secret) and return its path."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / unit_name(config)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(config, user))
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def systemd_running() -> bool:
    """Whether systemd is this machine's init (else there is nothing to enable now)."""
    return Path("/run/systemd/system").is_dir()
