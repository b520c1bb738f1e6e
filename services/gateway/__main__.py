from services.gateway.app import Gateway
from services.gateway.settings import GatewaySettings
from shared.mesh.endpoint import run_process

run_process(GatewaySettings, lambda settings: Gateway(settings).run())
