import sys

import uvloop

from shared.kit import log
from shared.kit.startup import exit_cleanly_if_it_cannot_listen
from sidecar.main import Sidecar
from sidecar.settings import SettingsError, SidecarSettings


def main() -> None:
    try:
        settings = SidecarSettings.from_env()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    log.setup("sidecar", settings.service, settings.instance)
    with exit_cleanly_if_it_cannot_listen():
        uvloop.run(Sidecar(settings).run())


main()
