import uvloop

from services.gateway.app import Gateway, Settings
from shared import log


def main() -> None:
    settings = Settings()
    log.setup("gateway", settings.service, settings.instance)
    uvloop.run(Gateway(settings).run())


main()
