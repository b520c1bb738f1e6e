import sys

import uvloop

from services.gateway.app import Gateway
from services.gateway.settings import GatewaySettings
from shared.kit import log
from shared.kit.startup import exit_cleanly_if_it_cannot_listen
from shared.mesh.envstruct import SettingsError


def main() -> None:
    try:
        settings = GatewaySettings.from_env()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    log.setup("gateway", settings.service, settings.instance)
    with exit_cleanly_if_it_cannot_listen():
        uvloop.run(Gateway(settings).run())


main()
