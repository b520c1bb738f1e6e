"""Infrastructure the supervisor can run itself: a Consul agent and a PostgreSQL server."""


class InfraError(Exception):
    """Infrastructure could not be brought up; the message says why."""
