from services.example.app import build
from shared.app import run

run(build())
