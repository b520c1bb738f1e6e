from services.auth.app import build
from shared.kit.app import run

run(build())
