import sys

import uvloop

from shared import log
from sidecar.main import Sidecar
from sidecar.settings import SettingsError, from_env


def main() -> None:
    try:
        settings = from_env()
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)
    log.setup("sidecar", settings.service, settings.instance)
    uvloop.run(Sidecar(settings).run())


main()
