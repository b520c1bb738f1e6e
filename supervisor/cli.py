"""The `supervisor` command: start the stack, or talk to the running supervisor.

Every verb pays for what this module imports, and the common ones (status, scale,
restart, stop...) are one request to the control socket: so only what they need is
imported here (the control client is the standard library's http.client), and the
daemon, asyncio, aiohttp and what a single verb needs are imported by that verb.
tests/test_structure.py checks that importing this module leaves aiohttp out.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import click
import msgspec

from supervisor import config as config_mod
from supervisor import state
from supervisor.control_client import ControlClient, ControlError, NotRunning


def _load(ctx: click.Context) -> config_mod.Config:
    try:
        return config_mod.load(ctx.obj["config_path"])
    except config_mod.ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def _call(cfg: config_mod.Config, method: str, route: str, body=None) -> dict:
    try:
        return ControlClient(cfg.socket_path).call(method, route, body)
    except NotRunning:
        click.echo(f"the supervisor is not running (no control socket answers at {cfg.socket_path})", err=True)
        sys.exit(3)
    except ControlError as exc:
        raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help=f"Configuration file (default: ./{config_mod.CONFIG_FILE} or $MESHVISOR_CONFIG).")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """meshvisor: run the services of the Procfile with Consul and PostgreSQL."""
    ctx.obj = {"config_path": config_path}


@main.command()
@click.argument("name", required=False)
@click.option("--detach", is_flag=True, help="Run in the background; return once every instance is up.")
@click.option("--wait", "wait_timeout", default=300.0, show_default=True,
              help="With --detach: how long to wait for the stack to come up (seconds).")
@click.option("--daemon", is_flag=True, hidden=True)
@click.pass_context
def start(ctx: click.Context, name: str | None, detach: bool, wait_timeout: float, daemon: bool) -> None:
    """Start the whole stack (in the foreground unless --detach), or NAME: one service
    of the running supervisor, stopped with `stop NAME`."""
    cfg = _load(ctx)
    if name is not None:
        if detach or daemon:
            raise click.UsageError("--detach is for the whole stack; `start NAME` asks the running supervisor")
        _service_verb(cfg, "start", name)
        return
    holder = state.holder_pid(cfg.state_dir)
    if holder:
        raise click.ClickException(f"a supervisor is already running for {cfg.state_dir} (pid {holder})")
    if detach:
        sys.exit(_start_detached(cfg, wait_timeout))
    import asyncio

    from supervisor.daemon import Daemon

    code = asyncio.run(Daemon(cfg, foreground=not daemon).run())
    sys.exit(code)


def _service_verb(cfg: config_mod.Config, verb: str, name: str) -> None:
    """`start NAME` / `stop NAME`, answered once done: a name that cannot be a service's
    is not sent (it would not fit the route)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        click.echo(f"error: no service named '{name}'", err=True)
        sys.exit(1)
    outcome = _call(cfg, "POST", f"/v1/services/{name}/{verb}")
    _report(outcome, f"{'stopped' if verb == 'stop' else 'started'} {name}")


def _start_detached(cfg: config_mod.Config, wait_timeout: float) -> int:
    import subprocess

    state.prepare(cfg.state_dir)
    out_path = cfg.state_dir / "logs" / "supervisor.out"
    argv = [sys.executable, "-m", "supervisor", "--config", str(cfg.config_path), "start", "--daemon"]
    with open(out_path, "ab") as out:
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(cfg.root),
        )
    click.echo(f"supervisor started in the background (pid {child.pid}); waiting for the stack")
    deadline = time.monotonic() + wait_timeout
    client = ControlClient(cfg.socket_path, timeout=5)
    while time.monotonic() < deadline:
        if child.poll() is not None:
            click.echo(f"the supervisor exited with code {child.returncode}; last lines of its log:", err=True)
            for line in _tail(cfg.state_dir / "logs" / "supervisor.log", 15):
                click.echo("  " + line, err=True)
            return 1
        try:
            report = client.call("GET", "/v1/status")
        except (NotRunning, ControlError, OSError):
            time.sleep(0.3)
            continue
        phase = report["supervisor"]["phase"]
        if phase in ("running", "failed"):
            problems = report["supervisor"]["problems"]
            _print_table(report, problems=False)
            if problems:
                for problem in problems:
                    click.echo(f"problem: {problem}", err=True)
                return 1
            return 0
        time.sleep(0.3)
    click.echo(f"the stack was not up within {wait_timeout:g}s; see `supervisor status`", err=True)
    return 1


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--cluster", "whole_cluster", is_flag=True,
              help="Every host of the Consul cluster and every service's instances on each, read from Consul.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, whole_cluster: bool) -> None:
    """Every process: state, pid, uptime, restarts, CPU, memory, port (--cluster: every host)."""
    cfg = _load(ctx)
    if whole_cluster:
        _cluster_status(cfg, as_json)
        return
    report = _call(cfg, "GET", "/v1/status")
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(report)).decode())
        return
    _print_table(report)


def _cluster_status(cfg: config_mod.Config, as_json: bool) -> None:
    """Asked of the running supervisor, which reads Consul with its own token; with an
    external agent (which outlives this host's supervisor) and no supervisor running, of
    the agent directly with [consul] token."""
    from supervisor import cluster

    try:
        payload = ControlClient(cfg.socket_path, timeout=60).call("GET", "/v1/cluster")
        picture = msgspec.convert(payload, cluster.Picture)
    except NotRunning:
        if cfg.consul.mode == "embedded":
            click.echo(f"the supervisor is not running (no control socket answers at {cfg.socket_path}), "
                       "and with it its Consul agent", err=True)
            sys.exit(3)
        import asyncio

        try:
            picture = asyncio.run(cluster.read(cfg.consul.address, cfg.consul.token))
        except cluster.Unreachable as exc:
            raise click.ClickException(str(exc)) from None
    except (ControlError, msgspec.ValidationError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(picture)).decode())
    else:
        click.echo(cluster.render(picture), nl=False)


def _print_table(report: dict, problems: bool = True) -> None:
    sup = report["supervisor"]
    click.echo(f"supervisor pid {sup['pid']}, {sup['phase']}, up {_duration(sup['uptime'])}, state in {sup['state_dir']}")
    header = ["SERVICE", "INSTANCE", "PROCESS", "PID", "STATE", "UPTIME", "RESTARTS", "CPU%", "MEM", "PORT", "CONSUL"]
    rows = []
    for row in report["processes"]:
        rows.append([
            row["service"] if row["instance"] is not None else row["process"],
            str(row["instance"]) if row["instance"] is not None else "-",
            row["process"],
            str(row["pid"] or "-"),
            row["state"],
            _duration(row["uptime"]) if row["uptime"] is not None else "-",
            str(row["restarts"]),
            f"{row['cpu_percent']:.1f}",
            _size(row["memory"]) if row["memory"] else "-",
            str(row["port"] or "-"),
            row.get("consul") or "-",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for row in report["processes"]:
        if row["reason"]:
            click.echo(f"{row['process']}: {row['reason']}")
        for problem in row.get("mesh_problems") or ():
            click.echo(f"{row['process']}: {problem}")
    for problem in sup["problems"] if problems else []:
        click.echo(f"problem: {problem}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _size(n: int) -> str:
    for unit in ("B", "K", "M", "G"):
        if n < 1024 or unit == "G":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


@main.command()
@click.argument("counts", nargs=-1, required=True)
@click.pass_context
def scale(ctx: click.Context, counts: tuple[str, ...]) -> None:
    """Set instance counts: supervisor scale auth=3 example=2"""
    cfg = _load(ctx)
    wanted: dict[str, int] = {}
    for item in counts:
        name, sep, number = item.partition("=")
        if not sep or not name or not number.isdigit():
            raise click.UsageError(f"'{item}' is not NAME=COUNT (e.g. auth=3)")
        if name not in cfg.services:
            raise click.UsageError(f"no service named '{name}' (services: {', '.join(cfg.services)})")
        wanted[name] = int(number)
    outcome = _call(cfg, "POST", "/v1/scale", {"counts": wanted})
    _report(outcome, "scaled " + ", ".join(f"{k}={v}" for k, v in wanted.items()))


@main.command()
@click.argument("target")
@click.pass_context
def restart(ctx: click.Context, target: str) -> None:
    """Restart NAME (every instance, one at a time) or NAME.INDEX."""
    cfg = _load(ctx)
    outcome = _call(cfg, "POST", "/v1/restart", {"target": target})
    _report(outcome, f"restarted {target}")


def _report(outcome: dict, success: str) -> None:
    if outcome["ok"]:
        if success:
            click.echo(success)
        return
    for problem in outcome["problems"]:
        click.echo(f"error: {problem}", err=True)
    sys.exit(1)


@main.command()
@click.argument("name", required=False)
@click.option("--timeout", default=120.0, show_default=True, help="How long to wait for the stop (seconds).")
@click.pass_context
def stop(ctx: click.Context, name: str | None, timeout: float) -> None:
    """Stop the whole stack and the supervisor, or NAME: one service (drained), which
    stays stopped across restarts of the stack until `start NAME`."""
    cfg = _load(ctx)
    if name is not None:
        _service_verb(cfg, "stop", name)
        return
    pid = state.holder_pid(cfg.state_dir)
    _call(cfg, "POST", "/v1/stop")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state.holder_pid(cfg.state_dir) is None:
            click.echo("stopped")
            return
        time.sleep(0.2)
    raise click.ClickException(f"the supervisor (pid {pid}) is still stopping after {timeout:g}s")


@main.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Read the Procfile and the config again and apply what changed (as SIGHUP does):
    add, remove, restart (rolling) and scale services; the others keep running."""
    try:
        cfg = config_mod.load(ctx.obj["config_path"])
    except config_mod.ConfigError as exc:
        click.echo(f"error: configuration error: {exc}; nothing was changed", err=True)
        sys.exit(1)
    outcome = _call(cfg, "POST", "/v1/reload")
    if outcome["ok"]:
        shown = cfg.config_path.relative_to(cfg.root) if cfg.config_path.is_relative_to(cfg.root) else cfg.config_path
        click.echo(f"reloaded the Procfile and {shown}")
    for line in outcome.get("changes") or ():
        click.echo(f"  {line}")
    _report(outcome, "")


@main.command()
@click.argument("target", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "lines", default=50, show_default=True, help="How many past lines to show.")
@click.pass_context
def logs(ctx: click.Context, target: str | None, follow: bool, lines: int) -> None:
    """Show logs of every process, of one service (NAME) or of one instance (NAME.INDEX)."""
    cfg = _load(ctx)
    from supervisor import logview
    from supervisor.logs import Printer

    files = logview.select(cfg.state_dir / "logs", target)
    if not files:
        raise click.ClickException(f"no logs for {target or 'any process'} in {cfg.state_dir / 'logs'}")
    printer = Printer()
    try:
        logview.show(files, lines, follow, printer)
    except KeyboardInterrupt:
        pass


@main.command()
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def trace(ctx: click.Context, request_id: str, as_json: bool) -> None:
    """One request's path through the gateway, sidecars and apps, from every process's
    logs, as a waterfall: REQUEST_ID is a response's X-Request-Id."""
    cfg = _load(ctx)
    import shutil

    from supervisor import trace as trace_mod
    from supervisor import waterfall

    if not trace_mod.REQUEST_ID.fullmatch(request_id):
        raise click.UsageError(f"'{request_id}' is not a request id (1-128 of A-Z a-z 0-9 . _ : -)")
    log_dir = cfg.state_dir / "logs"
    try:
        found = trace_mod.read(log_dir, request_id)
    except trace_mod.NotFound:
        click.echo(f"no log line of request {request_id} in {log_dir}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(msgspec.json.format(msgspec.json.encode(waterfall.as_json(found))).decode())
        return
    encoding = (sys.stdout.encoding or "").lower().replace("-", "")
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None  # piped: whole labels
    click.echo(waterfall.render(found, width=width, unicode=encoding == "utf8"), nl=False)


def _consul_token(cfg: config_mod.Config) -> str:
    """The supervisor's Consul token: [consul] token if given (a cluster's hosts are given
    the management token there), else the one the embedded agent's ACLs were made with."""
    if cfg.consul.mode == "embedded" and cfg.consul.acl and not cfg.consul.token:
        from supervisor.infra.acl import Secrets

        secrets = Secrets(cfg.state_dir)
        if not secrets.has_management_token():
            raise click.ClickException(f"no management token in {secrets.dir}: the stack has not started "
                                       "here yet (supervisor start makes it)")
        try:
            return secrets.management_token()
        except PermissionError:
            raise click.ClickException(f"{secrets.dir} is readable by its owner only") from None
    return cfg.consul.token


@main.command()
@click.pass_context
def token(ctx: click.Context) -> None:
    """Print the Consul management token (for the UI's login and the consul CLI)."""
    cfg = _load(ctx)
    value = _consul_token(cfg)
    if not value:
        raise click.ClickException("Consul runs without ACLs here: no token is needed")
    click.echo(value)


@main.command()
@click.argument("change", nargs=-1)
@click.pass_context
def intentions(ctx: click.Context, change: tuple[str, ...]) -> None:
    """List who may call whom; `intentions allow|deny SOURCE DESTINATION` changes one.

    SOURCE and DESTINATION are service names or * (every service); an exact name wins
    over *. A change reaches open connections within about 2 s.
    """
    import asyncio

    cfg = _load(ctx)
    if change and (len(change) != 3 or change[0] not in ("allow", "deny")):
        raise click.UsageError("intentions [allow|deny SOURCE DESTINATION]")
    token_value = _consul_token(cfg)
    click.echo(asyncio.run(_intentions(cfg.consul.address, token_value, change)), nl=False)


async def _intentions(address: str, token_value: str, change: tuple[str, ...]) -> str:
    from shared.mesh.consul import ConsulError, make_client
    from shared.mesh.intentions import list_intentions, upsert

    client = make_client(address, token_value)
    try:
        if change:
            action, source, destination = change
            _, changed = await upsert(client, source, destination, action, description="set with supervisor intentions")
            return f"{source} -> {destination}: {action}{'' if changed else ' (already so)'}\n"
        rows = [("SOURCE", "DESTINATION", "ACTION", "DESCRIPTION")]
        rows += [(i.source, i.destination, i.action, i.description) for i in await list_intentions(client)]
        widths = [max(len(r[c]) for r in rows) for c in range(3)]
        return "".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}\n" for r in rows)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except (ConsulError, OSError) as exc:
        raise click.ClickException(f"Consul at {address}: {exc}") from None
    finally:
        await client.close()


@main.command("install-service")
@click.option("--unit-dir", type=click.Path(file_okay=False, path_type=Path), default="/etc/systemd/system",
              show_default=True, help="Where to write the unit.")
@click.option("--user", default=None, help="Run the stack as this user (default: the one installing).")
@click.option("--print", "print_only", is_flag=True, help="Print the unit, write nothing.")
@click.option("--no-enable", is_flag=True, help="Write the unit but do not enable and start it.")
@click.pass_context
def install_service(ctx: click.Context, unit_dir: Path, user: str | None, print_only: bool, no_enable: bool) -> None:
    """Run this stack at boot as a systemd service (systemctl stop stops it cleanly)."""
    cfg = _load(ctx)
    import subprocess

    from supervisor import unit

    if print_only:
        click.echo(unit.render(cfg, user), nl=False)
        return
    try:
        path = unit.install(cfg, unit_dir, user)
    except PermissionError:
        raise click.ClickException(f"cannot write to {unit_dir}: run it as root (or pass --unit-dir)") from None
    name = path.name
    click.echo(f"wrote {path}")
    if no_enable or not unit.systemd_running():
        if not no_enable:
            click.echo("systemd is not running here: enable it where it is, with")
        click.echo(f"  systemctl daemon-reload && systemctl enable --now {name}")
        return
    for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", name]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            raise click.ClickException(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    click.echo(f"enabled and started {name}: systemctl status {name}; journalctl -u {name} -f")


@main.command()
def keygen() -> None:
    """Print a new Consul gossip encryption key (for the agents' `encrypt`)."""
    import base64
    import secrets

    # What `consul keygen` of 1.8 prints: base64 of 32 random bytes (16 and 24 work too).
    click.echo(base64.b64encode(secrets.token_bytes(32)).decode())


def _tail(path: Path, count: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except FileNotFoundError:
        return []


if __name__ == "__main__":  # pragma: no cover
    main()
