import uvloop

from services.gateway.app import Gateway, Settings
from shared.kit import log
from shared.kit.startup import exit_cleanly_if_it_cannot_listen


def main() -> None:
    settings = Settings()
    log.setup("gateway", settings.service, settings.instance)
    with exit_cleanly_if_it_cannot_listen():
        uvloop.run(Gateway(settings).run())


main()
