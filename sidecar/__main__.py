from shared.mesh.endpoint import run_process
from sidecar.main import Sidecar
from sidecar.settings import SidecarSettings

run_process(SidecarSettings, lambda settings: Sidecar(settings).run())
