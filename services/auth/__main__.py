from services.auth.app import build
from shared.app import run

run(build())
