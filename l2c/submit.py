"""`l2c submit`: run any l2c command as a Ray job on a cluster (being written)."""


def register(app) -> None:
    pass
